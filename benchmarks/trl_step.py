"""`python -m benchmarks.trl_step`: FocalPOTrainer's training step against TRL's DPOTrainer on the same model.

Both trainers train copies of one randomly initialised Llama-style model (with an explicit reference model) on
the same synthetic preference data, with the same TrainingArguments; only the trainer class (and so the fused
head and the loss) differs. Reported per trainer: the median step time (optimizer step included) over the timed
steps, and the peak GPU memory during them, absolute and above the memory held when the step began.

    python -m benchmarks.trl_step                      # GPU: Llama-3-8B head (H=4096, V=128256), 2 layers, bf16
    python -m benchmarks.trl_step --layers 4 --batch 8 --prompt-len 512 --completion-len 1536
    python -m benchmarks.trl_step --tiny               # tiny shapes (the default without a GPU): a smoke run
    python -m benchmarks.trl_step --torch-compile inductor --warmup 5   # both trainers compiled

The loss: FocalPOTrainer's --loss-type (default focal) against DPOTrainer's --dpo-loss-type (default the same
with focal read as sigmoid, DPO being FocalPO at γ = 0); every row names its loss. A trainer that fails
(out of memory, or any error) gets a row saying so, and the others still run; the JSON is written after
every row.

With --shrink, a trainer that runs out of memory at the requested batch is retried at half the batch (down to
1), and its row says at which batch it ran: the trainers' rows may then be at different batches (the other is
not re-run), so compare per-pair times there.
Without a GPU, times are CPU times through Triton's interpreter (for the smoke run only, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .environment import describe, is_out_of_memory, prepare_environment
from .runner import describe_failure

prepare_environment()  # TRITON_INTERPRET=1 without a GPU; before anything imports triton

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, help="hidden size (default 4096; 32 tiny)")
    p.add_argument("--vocab", type=int, help="vocabulary rows of the head (default 128256; 256 tiny)")
    p.add_argument("--layers", type=int, help="decoder layers (default 2)")
    p.add_argument("--intermediate", type=int, help="MLP size (default 14336; 64 tiny)")
    p.add_argument("--batch", type=int, help="pairs per device step (default 4; 2 tiny)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 256; 4 tiny)")
    p.add_argument("--completion-len", type=int, help="completion tokens, chosen and rejected (default 768; 4 tiny)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; 2 tiny)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 tiny)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (default bf16)")
    p.add_argument("--loss-type", default="focal", help="FocalPOTrainer's loss_type, a comma list (default focal)")
    p.add_argument("--dpo-loss-type", help="DPOTrainer's loss_type, a comma list (default --loss-type with focal "
                                           "read as sigmoid: DPO is FocalPO at gamma = 0)")
    p.add_argument("--impls", default="dpo,focalpo", help="comma list of dpo (TRL), focalpo (default both)")
    p.add_argument("--padding-free", action="store_true", help="FocalPOTrainer with padding_free=True too")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for both (TRL's default is on; "
                   "off here so the head's share of the step shows)")
    p.add_argument("--torch-compile", metavar="BACKEND", help="both trainers with torch_compile=True and this "
                   "backend (inductor on a GPU; aot_eager is quicker to compile); the warm-up steps compile")
    p.add_argument("--shrink", action="store_true", help="halve the batch on OOM until it fits")
    p.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    defaults = dict(hidden=32, vocab=256, layers=2, intermediate=64, batch=2, prompt_len=4, completion_len=4,
                    steps=2, warmup=1) if tiny else dict(hidden=4096, vocab=128256, layers=2, intermediate=14336,
                                                         batch=4, prompt_len=256, completion_len=768, steps=10,
                                                         warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tiny = tiny
    args.loss_type = _loss_types(args.loss_type, "--loss-type")
    args.dpo_loss_type = (_loss_types(args.dpo_loss_type, "--dpo-loss-type") if args.dpo_loss_type else
                          ["sigmoid" if name == "focal" else name for name in args.loss_type])
    return args


def _loss_types(text: str, option: str) -> list:
    from focal_kernels import LOSS_TYPES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOSS_TYPES]
    if not names or unknown:
        raise SystemExit(f"{option}: unknown loss types {unknown or text!r}; known: {', '.join(LOSS_TYPES)}")
    return names


VERSIONED = ("trl", "transformers", "accelerate", "peft", "datasets")


def package_versions() -> dict:
    """The versions of the packages a trainer step runs through (None: not installed)."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def make_tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def make_dataset(n_rows: int, n_words: int, prompt_len: int, completion_len: int, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def text(n):
        return " ".join(f"w{i}" for i in torch.randint(n_words, (n,), generator=g).tolist())

    # Completions end with the EOS TRL appends: completion_len - 1 words + EOS
    return Dataset.from_dict({
        "prompt": [text(prompt_len) for _ in range(n_rows)],
        "chosen": [" " + text(completion_len - 1) for _ in range(n_rows)],
        "rejected": [" " + text(completion_len - 1) for _ in range(n_rows)],
    })


def make_model(args, tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.hidden // 128 if args.hidden >= 512 else 4
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        # Llama-3's head width (128) and 4 query heads per key-value head (where they divide; else no grouping);
        # 4 and 2 heads below H = 512
        num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=(heads // 4 if heads % 4 == 0 else heads) if args.hidden >= 512 else 2,
        max_position_embeddings=args.prompt_len + args.completion_len + 8, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model


def run_one(impl: str, args, batch: int, tokenizer, dataset, out_dir: str) -> dict:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peaks, starts = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                starts.append(torch.cuda.memory_allocated())
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t0)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated())

    common = dict(
        output_dir=out_dir, report_to="none", per_device_train_batch_size=batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-6, save_strategy="no", logging_steps=10**9, disable_tqdm=True, use_cpu=not cuda,
        bf16=args.dtype == "bf16" and cuda, gradient_checkpointing=args.gradient_checkpointing, seed=0,
        max_length=None, dataloader_num_workers=0,
    )
    if args.torch_compile:
        common.update(torch_compile=True, torch_compile_backend=args.torch_compile)
        torch._dynamo.reset()  # each trainer compiles its own model, none reuses the other's graphs
    if impl == "dpo":
        config, trainer_cls = DPOConfig(loss_type=args.dpo_loss_type, **common), DPOTrainer
    else:
        padding_free = impl == "focalpo_padding_free"
        config = FocalPOConfig(loss_type=args.loss_type, padding_free=padding_free, **common)
        trainer_cls = FocalPOTrainer
    model = make_model(args, tokenizer, seed=0)
    ref_model = make_model(args, tokenizer, seed=1)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    try:
        trainer.train()
        losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
        compiled = hasattr(trainer.model_wrapped, "_orig_mod")  # accelerate wrapped it in torch.compile
    finally:
        del trainer, model, ref_model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    timed = times[args.warmup:]
    loss_type = config.loss_type if isinstance(config.loss_type, str) else ",".join(config.loss_type)
    row = {"impl": impl, "loss_type": loss_type, "batch": batch, "status": "ok",
           "step_ms": 1e3 * statistics.median(timed),
           "step_ms_all": [1e3 * t for t in timed], "train_loss": losses[-1] if losses else None,
           "compiled": compiled}
    if cuda:
        row["peak_mib"] = max(peaks[args.warmup:]) / 2**20
        row["peak_above_step_start_mib"] = max(p - s for p, s in zip(peaks[args.warmup:], starts[args.warmup:])) / 2**20
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.padding_free and "focalpo" in impls:
        impls.append("focalpo_padding_free")
    unknown = set(impls) - {"dpo", "focalpo", "focalpo_padding_free"}
    if unknown:
        raise SystemExit(f"unknown impls: {sorted(unknown)}")
    n_words = min(args.vocab - 3, 30000)
    tokenizer = make_tokenizer(n_words)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: smoke run)"
    shape = (f"H={args.hidden} V={args.vocab} layers={args.layers} {args.dtype}, "
             f"{args.prompt_len}+{args.completion_len} tokens per sequence"
             + (f", torch_compile={args.torch_compile}" if args.torch_compile else ""))
    versions = package_versions()
    losses = f"FocalPOTrainer loss_type={','.join(args.loss_type)}, DPOTrainer loss_type={','.join(args.dpo_loss_type)}"
    print(f"# FocalPOTrainer vs DPOTrainer step — {device}\n# {shape}; {losses}\n# "
          + ", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
    # the commit and the versions (describe), as the other benchmarks' JSON carries them
    result = {**describe(torch.device("cuda" if cuda else "cpu")), "device": device, "shape": shape,
              "versions": versions, "args": dict(vars(args)), "rows": [], "complete": False}
    rows = result["rows"]

    def write():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))

    write()
    with tempfile.TemporaryDirectory() as out_dir:
        for impl in impls:
            batch = args.batch
            while True:
                dataset = make_dataset(batch * (args.warmup + args.steps), n_words, args.prompt_len,
                                       args.completion_len)
                row = failure = None
                try:
                    row = run_one(impl, args, batch, tokenizer, dataset, out_dir)
                except Exception as exc:  # one trainer's failure must not lose the other's row
                    oom = is_out_of_memory(exc)
                    failure = (oom, f"{'oom' if oom else 'error'}: {describe_failure(exc)}")
                    if not oom:
                        print(f"{impl}: error\n" + "".join(traceback.format_exc(limit=-4)), flush=True)
                    traceback.clear_frames(exc.__traceback__)  # the frames hold the trainer and its model
                if failure is not None:
                    gc.collect()  # outside the except block: nothing holds the failed trainer now
                    if cuda:
                        torch.cuda.empty_cache()
                    oom, status = failure
                    if oom and args.shrink and batch > 1:
                        print(f"{impl}: out of memory at batch {batch}, retrying at {batch // 2}", flush=True)
                        batch //= 2
                        continue
                    intended = args.dpo_loss_type if impl == "dpo" else args.loss_type
                    row = {"impl": impl, "loss_type": ",".join(intended), "batch": batch, "status": status}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "step_ms_all"}), flush=True)
                write()
                break

    print("\n| trainer | loss_type | pairs/step | step ms (median) | peak MiB | peak above step start MiB | "
          "mean train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(key, spec):
            value = r.get(key)
            return "—" if value is None else format(value, spec)
        print(f"| {r['impl']} | {r.get('loss_type', '—')} | {r['batch']} | {fmt('step_ms', '.1f')} | "
              f"{fmt('peak_mib', '.0f')} | {fmt('peak_above_step_start_mib', '.0f')} | {fmt('train_loss', '.4f')} |"
              + ("" if r["status"] == "ok" else f" {r['status']}"))
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    if "dpo" in ok and "focalpo" in ok and ok["dpo"]["batch"] == ok["focalpo"]["batch"]:
        d, f = ok["dpo"], ok["focalpo"]
        print(f"\nDPOTrainer ({d['loss_type']}) / FocalPOTrainer ({f['loss_type']}) step time: "
              f"{d['step_ms'] / f['step_ms']:.2f}x", end="")
        if "peak_above_step_start_mib" in d:
            print(f"; peak above step start: {d['peak_above_step_start_mib']:.0f} vs "
                  f"{f['peak_above_step_start_mib']:.0f} MiB", end="")
        print()
    result["complete"] = all(r["status"] == "ok" for r in rows)
    write()
    return 0 if all(r["status"] == "ok" and math.isfinite(r["step_ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
