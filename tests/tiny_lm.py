"""A tiny Llama-style causal LM, a tokenizer trained on the fly and a preference dataset, all built in code.

Nothing is downloaded: the tokenizer is a word-level one trained by `tokenizers` on the dataset's own text.
"""

from __future__ import annotations

import copy

import torch

WORDS = "red green blue cat dog bird one two three four five six up down left right yes no".split()


def preference_rows(n: int = 8, seed: int = 0) -> dict[str, list[str]]:
    """Prompts of a few words; `chosen` repeats the prompt's last word, `rejected` is a different word.

    The completions have different lengths within a batch (so padding, ld_alpha's tail and padding-free matter).
    """
    g = torch.Generator().manual_seed(seed)
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        idx = torch.randint(len(WORDS), (2 + i % 3,), generator=g).tolist()
        words = [WORDS[j] for j in idx]
        last = words[-1]
        other = WORDS[(WORDS.index(last) + 1 + i) % len(WORDS)]
        prompts.append("say " + " ".join(words) + " :")
        chosen.append(" " + " ".join([last] * (1 + i % 2)))
        rejected.append(" " + " ".join([other] * (1 + (i + 1) % 3)))
    return {"prompt": prompts, "chosen": chosen, "rejected": rejected}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>", "<bos>"])
    corpus = ["say : " + " ".join(WORDS)]
    tok.train_from_iterator(corpus, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces; only used for warnings
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def make_model(tokenizer, *, hidden: int = 32, layers: int = 2, vocab: int = 256, seed: int = 0, tie: bool = False,
               dtype=torch.float32):
    """A Llama-style model with `vocab` rows in its head (more than the tokenizer uses, like real models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_moe_model(tokenizer, *, hidden: int = 32, layers: int = 2, vocab: int = 256, seed: int = 0):
    """A Mixtral-style mixture of experts (4 experts, 2 a token) whose forward returns its router logits, so
    that trainers add the router's load-balancing loss (coefficient 0.1)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def clone(model):
    return copy.deepcopy(model)
