"""README.md's python examples, run as a user would copy them: tiny stand-ins for what each block leaves to the
user (model, batch, tensors, process groups), then the block's own text, then a check of its result against
the float64 reference. A renamed function, keyword or return field in the library (or in the README) fails here.

Blocks are found by their section heading and first line (`README_BLOCKS`); a new python block in the README
fails `test_every_python_block_is_covered` until it gets a test here. Multi-process and GPU-only code is not run
on several ranks / a GPU: the distributed blocks run on a one-rank gloo group, the CUDA-graph block on CPU
stand-ins for `torch.cuda` (after checking that every `torch.cuda` name it uses exists).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import focal_kernels as fk

README = Path(__file__).resolve().parents[1] / "README.md"
TESTS = Path(__file__).resolve().parent
V, H = 61, 32  # tiny vocabulary and hidden size

# (section heading, first line of the block) for every ```python block of the README, in order.
README_BLOCKS = [
    ("Use inside a training step", "import torch"),
    ("From hidden states, in a plain PyTorch loop with a Hugging Face model", "import torch"),
    ("Packed sequences (padding-free)", "import focal_kernels as fk"),
    ("Use with TRL", "from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer"),
    ("Vocabulary-parallel (tensor-parallel lm_head)", "import focal_kernels as fk"),
    ("Sequence (context) parallel", "import focal_kernels as fk"),
    ("torch.compile and CUDA graphs", "import torch"),
    ("torch.compile and CUDA graphs", "static = [chosen_logits, rejected_logits, chosen_labels, rejected_labels]"),
    ("API", "# Layer 1: log-probs"),
    ("Preference losses on per-sequence log-probs", "import focal_kernels as fk"),
]


# ---------------------------------------------------------------------------------------------------------------
# Reading the README


def _python_blocks() -> list[tuple[str, str, str]]:
    """(heading, first line without its trailing comment, code) of each ```python block, in order."""
    blocks, heading, code = [], None, None
    for line in README.read_text().splitlines():
        if code is not None:
            if line.strip() == "```":
                first = code[0].split("  #")[0].rstrip()
                blocks.append((heading, first, "\n".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```python":
            code = []
    return blocks


def block(heading: str, first_line: str) -> str:
    found = [code for h, first, code in _python_blocks() if (h, first) == (heading, first_line)]
    assert len(found) == 1, f"README: expected one python block under '{heading}' starting {first_line!r}"
    return found[0]


def run(code: str, **placeholders) -> dict:
    """Execute a README block in a fresh namespace holding the placeholders; return the namespace."""
    namespace = dict(placeholders)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def commented_alternative(code: str, marker: str) -> str:
    """The expression a block offers in a comment, e.g. '# or directly: f(x)' -> 'f(x)'."""
    match = re.search(rf"#\s*{re.escape(marker)}\s*(.+)$", code, re.M)
    assert match, f"README block lost its comment {marker!r}"
    return match.group(1).strip()


def test_every_python_block_is_covered():
    assert [(h, first) for h, first, _ in _python_blocks()] == README_BLOCKS


# ---------------------------------------------------------------------------------------------------------------
# Shared tiny stand-ins


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def labels_like(input_ids, prompt_len):
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    return labels


def reference_logps(logits, labels):
    """float64 spec on already-shifted logits / labels."""
    return fk.reference.sequence_logps(logits.detach().double(), labels)


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# "Use inside a training step"


def test_training_step():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    chosen_ids = torch.randint(V, (2, 7), generator=generator)
    rejected_ids = torch.randint(V, (2, 6), generator=generator)
    batch = {"chosen_input_ids": chosen_ids, "rejected_input_ids": rejected_ids,
             "chosen_labels": labels_like(chosen_ids, 2), "rejected_labels": labels_like(rejected_ids, 3),
             "ref_chosen_logps": torch.tensor([-20.0, -25.0]), "ref_rejected_logps": torch.tensor([-22.0, -21.0])}
    with torch.no_grad():  # what the step should compute, before its optimizer step changes the model
        c = reference_logps(model(chosen_ids).logits[:, :-1], batch["chosen_labels"][:, 1:])
        r = reference_logps(model(rejected_ids).logits[:, :-1], batch["rejected_labels"][:, 1:])
        expected = fk.preference_loss(c, r, batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double(),
                                      beta=0.1, gamma=0.05).metrics
    before = model.lm_head.weight.detach().clone()

    ns = run(block(*README_BLOCKS[0]))
    metrics = ns["training_step"](model, batch, torch.optim.SGD(model.parameters(), lr=0.1))

    assert isinstance(ns["loss_fn"], fk.FocalPOLoss) and (ns["loss_fn"].beta, ns["loss_fn"].gamma) == (0.1, 0.05)
    # TRL's names, as listed under "Preference losses on per-sequence log-probs": "metrics are `rewards/chosen`, ..."
    listed = re.search(r"metrics are (`.*?) as 0-dim", README.read_text(), re.S).group(1)
    assert set(metrics) == set(expected) == set(re.findall(r"`([\w/]+)`", listed))
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name  # detached 0-dim tensors
        assert_close(value, expected[name])
    assert not torch.equal(model.lm_head.weight, before)  # backward reached the weights and the step ran

    # The prose after the block: reference log-probs under no_grad, and its hidden-state alternative.
    text = README.read_text()
    expr = re.search(r"Reference-model log-probs, under `torch.no_grad\(\)`: `([^`]+)`", text).group(1)
    ref_logits = model(chosen_ids).logits
    with torch.no_grad():
        ref = eval(expr, {"fk": fk, "ref_logits": ref_logits, "labels": batch["chosen_labels"]})
    assert not ref.requires_grad
    assert_close(ref, reference_logps(ref_logits[:, :-1], batch["chosen_labels"][:, 1:]))
    assert callable(fk.fused_linear_sequence_logps)


# ---------------------------------------------------------------------------------------------------------------
# "From hidden states, in a plain PyTorch loop with a Hugging Face model"


def test_hidden_state_loop():
    model, ref_model = tiny_llama(seed=0), tiny_llama(seed=1)

    def side(prompt_len, length, seed):
        input_ids = torch.randint(V, (2, length), generator=torch.Generator().manual_seed(seed))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, -2:] = 0  # right padding on the second row
        labels = labels_like(input_ids, prompt_len).masked_fill(attention_mask == 0, -100)
        return input_ids, attention_mask, labels

    chosen, rejected = side(2, 7, seed=2), side(3, 6, seed=3)

    ns = run(block(*README_BLOCKS[1]), model=model, ref_model=ref_model, chosen=chosen, rejected=rejected)

    def expected_logps(m, input_ids, attention_mask, labels):  # the model's own logits, float64 spec
        with torch.no_grad():
            logits = m(input_ids=input_ids, attention_mask=attention_mask).logits
        return reference_logps(logits[:, :-1], labels[:, 1:])

    out = ns["out"]
    assert ns["logit_options"] == {"logit_softcap": None, "logit_scale": 1.0}
    assert_close(out.chosen_logps, expected_logps(model, *chosen))
    assert_close(out.rejected_logps, expected_logps(model, *rejected))
    assert_close(ns["ref_c"], expected_logps(ref_model, *chosen))
    expected = fk.preference_loss(expected_logps(model, *chosen), expected_logps(model, *rejected),
                                  expected_logps(ref_model, *chosen), expected_logps(ref_model, *rejected),
                                  loss_type="focal")
    assert_close(out.loss, expected.loss)
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ref_model.parameters())  # the reference ran under no_grad

    # "... hidden_states[-1] works for any model": the same hidden states as the backbone's.
    input_ids, attention_mask, _ = chosen
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
        backbone = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(full, backbone)


# ---------------------------------------------------------------------------------------------------------------
# "Packed sequences (padding-free)"


def test_packed_sequences():
    model = tiny_llama()
    lengths = [5, 4, 6, 3]  # chosen 0, rejected 0, chosen 1, rejected 1, interleaved by the "collator"
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    input_ids = torch.randint(V, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    completion_labels, start = input_ids.clone(), 0
    for n in lengths:  # a 2-token prompt per sequence
        completion_labels[0, start:start + 2] = -100
        start += n

    ns = run(block(*README_BLOCKS[2]), fk=fk, model=model, position_ids=position_ids, input_ids=input_ids,
             completion_labels=completion_labels)

    assert ns["cu_seqlens"].tolist() == [0, 5, 9, 15, 18]
    assert ns["hidden"].shape == (1, sum(lengths), H)
    expected, counts, start = [], [], 0
    for n in lengths:  # each sequence on its own, padded path, the model's own logits
        ids, labels = input_ids[:, start:start + n], completion_labels[:, start:start + n]
        with torch.no_grad():
            expected.append(reference_logps(model(ids).logits[:, :-1], labels[:, 1:]))
        counts.append(int((labels[:, 1:] != -100).sum()))
        start += n
    expected = torch.cat(expected)
    assert ns["logps"].shape == (len(lengths),)
    assert ns["counts"].tolist() == counts
    assert_close(ns["chosen_logps"], expected[0::2])
    assert_close(ns["rejected_logps"], expected[1::2])


# ---------------------------------------------------------------------------------------------------------------
# "Use with TRL"


def test_trl_trainer(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    sys.path.insert(0, str(TESTS))
    try:
        import tiny_lm  # the README points to it for a tiny model and tokenizer built offline
    finally:
        sys.path.remove(str(TESTS))
    monkeypatch.chdir(tmp_path)  # the block writes output_dir="out"
    tok = tiny_lm.make_tokenizer()
    model = tiny_lm.make_model(tok, layers=1)
    ds = datasets.Dataset.from_dict(tiny_lm.preference_rows(8))

    code = block(*README_BLOCKS[3])
    # The README: "On a machine without a GPU pass bf16=False" (TRL's DPOConfig defaults to bf16).
    assert "beta=0.1)" in code
    code = code.replace("beta=0.1)", "beta=0.1, bf16=False)")
    ns = run(code, model=model, ref_model=tiny_lm.clone(model), ds=ds, tok=tok)

    args, trainer = ns["args"], ns["trainer"]
    assert (args.loss_type, args.focal_gamma, args.beta) == (["focal"], 0.05, 0.1)
    assert trainer.state.global_step > 0
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/chosen", "rewards/accuracies", "logps/chosen"} <= logged
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ---------------------------------------------------------------------------------------------------------------
# "Beyond one GPU": the parallel blocks on a one-rank gloo group (every name and keyword is exercised)


@pytest.fixture
def mesh(one_rank_mesh):  # (conftest.py)
    return one_rank_mesh


def test_vocab_parallel(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(5)
    lm_head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(2, 5, H, requires_grad=True)
    labels = torch.randint(V, (2, 5))
    labels[:, 0] = -100
    full_logits = lm_head(hidden)
    expected = reference_logps(full_logits, labels)

    code = block(*README_BLOCKS[4])
    ns = run(code, mesh=mesh, lm_head_shard=lm_head, hidden=hidden, labels=labels, lm_head=lm_head,
             dtensor_logits=distribute_tensor(full_logits.detach(), mesh["tp"], [Shard(-1)]))

    assert_close(ns["logps"], expected)  # the last form: hidden states and this rank's lm_head rows
    ns["logps"].sum().backward()
    assert hidden.grad is not None and lm_head.weight.grad is not None
    # The alternative in the block's comment, and the imported hidden-state form (its `group` keyword).
    assert_close(eval(commented_alternative(code, "or directly:"), ns), expected)
    assert_close(ns["vocab_parallel_fused_linear_sequence_logps"](hidden, lm_head.weight, labels, group=ns["tp"]),
                 expected)


def test_sequence_parallel(mesh):
    torch.manual_seed(6)
    local_logits = torch.randn(2, 5, V, requires_grad=True)
    local_labels = torch.randint(V, (2, 5))
    expected = reference_logps(local_logits, local_labels)  # one rank: its slice is the whole sequence

    code = block(*README_BLOCKS[5])
    ns = run(code, fk=fk, mesh=mesh, local_logits=local_logits, local_labels=local_labels)

    assert_close(ns["logps"], expected)
    assert_close(eval(commented_alternative(code, "or:"), ns), expected)
    # "Both at once: ... sequence_parallel_sum(vocab_parallel_sequence_logps(x, y, group=tp), cp)"
    both = re.search(r"`(sequence_parallel_sum\(vocab_parallel_sequence_logps\([^`]+)`", README.read_text()).group(1)
    from focal_kernels.logprobs.parallel import vocab_parallel_sequence_logps

    ns.update(vocab_parallel_sequence_logps=vocab_parallel_sequence_logps, x=local_logits, y=local_labels,
              tp=mesh["tp"].get_group())
    assert_close(eval(both, ns), expected)


# ---------------------------------------------------------------------------------------------------------------
# "torch.compile and CUDA graphs"


def _pair_batch(batch, t_chosen, t_rejected, seed, prompt_len=1):
    g = torch.Generator().manual_seed(seed)
    chosen_logits = torch.randn(batch, t_chosen, V, generator=g, requires_grad=True)
    rejected_logits = torch.randn(batch, t_rejected, V, generator=g, requires_grad=True)
    chosen_labels = labels_like(torch.randint(V, (batch, t_chosen), generator=g), prompt_len)
    rejected_labels = labels_like(torch.randint(V, (batch, t_rejected), generator=g), 2)
    return chosen_logits, rejected_logits, chosen_labels, rejected_labels


def test_torch_compile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # (other tests in this process compiled too)
    ns = run(block(*README_BLOCKS[6]), torch=torch, fk=fk)
    for call, prompt_len in enumerate((1, 3)):  # same shapes, other labels and mask: no recompilation
        cl, rl, cy, ry = _pair_batch(2, 5, 4, seed=7 + call, prompt_len=prompt_len)
        loss = ns["loss"](cl, rl, cy, ry)
        loss.backward()
        c, r = reference_logps(cl, cy), reference_logps(rl, ry)
        expected = fk.preference_loss(c, r, loss_type="ipo", chosen_token_counts=(cy != -100).sum(-1),
                                      rejected_token_counts=(ry != -100).sum(-1)).loss
        assert_close(loss, expected)
        assert cl.grad is not None and rl.grad is not None
        assert counters["stats"]["unique_graphs"] == 1


def _cuda_stand_ins():
    """CPU stand-ins for the `torch.cuda` names the CUDA-graph block uses: streams and capture do nothing,
    so the block runs its calls eagerly."""

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    cuda = types.SimpleNamespace(Stream=Stream, current_stream=Stream, CUDAGraph=CUDAGraph,
                                 stream=lambda s: contextlib.nullcontext(), graph=lambda g: contextlib.nullcontext())
    return types.SimpleNamespace(**{k: getattr(torch, k) for k in ("autograd",)}, cuda=cuda)


def test_cuda_graph_capture_names_and_calls():
    code = block(*README_BLOCKS[7])
    used = {node.attr for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda"}
    assert used == {"Stream", "current_stream", "stream", "CUDAGraph", "graph"}
    assert all(hasattr(torch.cuda, name) for name in used) and hasattr(torch.cuda.CUDAGraph, "replay")
    assert (TESTS / "test_cuda.py").exists()  # the README points to it

    cl, rl, cy, ry = _pair_batch(2, 5, 4, seed=9)
    ns = run(code, torch=_cuda_stand_ins(), fk=fk, chosen_logits=cl.detach(), rejected_logits=rl.detach(),
             chosen_labels=cy, rejected_labels=ry)
    expected = fk.preference_loss(reference_logps(cl, cy), reference_logps(rl, ry), beta=0.1, gamma=0.05).loss
    assert_close(ns["out"].loss, expected)
    assert [g.shape for g in ns["grads"]] == [cl.shape, rl.shape]


# ---------------------------------------------------------------------------------------------------------------
# "API": the signatures it lists are the library's


def _documented_calls(code: str):
    """(name, parameter text) for each `fk.NAME(...)` of the listing (it is signatures, not runnable code)."""
    text = "\n".join(line.split("#")[0] for line in code.splitlines())
    for match in re.finditer(r"fk\.(\w+)\(", text):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield match.group(1), " ".join(text[match.end():i - 1].split())


def _check_signature(name, params_text):
    real = inspect.signature(getattr(fk, name).__init__ if inspect.isclass(getattr(fk, name)) else getattr(fk, name))
    real_params = [p for p in real.parameters.values() if p.name != "self"]
    open_ended = params_text.endswith("...")  # "..., ...)": more options follow
    params_text = re.sub(r",?\s*\.\.\.$", "", params_text)
    if not params_text or params_text.startswith("**"):  # fk.FocalPOLoss(...), fk.PreferenceLoss(**options)
        assert not params_text or any(p.kind is p.VAR_KEYWORD for p in real_params), name
        return
    documented = ast.parse(f"def f({params_text}): pass").body[0].args
    doc_params = {}
    positional = documented.posonlyargs + documented.args
    for arg, default in zip(positional, [None] * (len(positional) - len(documented.defaults)) + documented.defaults):
        doc_params[arg.arg] = (inspect.Parameter.POSITIONAL_OR_KEYWORD, default)
    for arg, default in zip(documented.kwonlyargs, documented.kw_defaults):
        doc_params[arg.arg] = (inspect.Parameter.KEYWORD_ONLY, default)
    real_by_name = {p.name: p for p in real_params}
    assert [p.name for p in real_params[:len(positional)]] == [a.arg for a in positional], name
    for pname, (kind, default) in doc_params.items():
        assert pname in real_by_name, f"README API: {name}() has no parameter {pname!r}"
        p = real_by_name[pname]
        assert p.kind == kind, f"README API: {name}({pname}) is {p.kind.description}, documented {kind.description}"
        want = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        assert p.default == want, f"README API: {name}({pname}) defaults to {p.default!r}, documented {want!r}"
    if documented.kwarg is not None:
        assert any(p.kind is p.VAR_KEYWORD for p in real_params), name
    undocumented = [p.name for p in real_params if p.name not in doc_params and p.kind is not p.VAR_KEYWORD]
    assert open_ended or all(real_by_name[n].kind is inspect.Parameter.KEYWORD_ONLY for n in undocumented), \
        f"README API: {name}() has undocumented positional parameters {undocumented}"
    return undocumented


def test_api_listing():
    code = block(*README_BLOCKS[8])
    calls = list(_documented_calls(code))
    assert {name for name, _ in calls} >= {"sequence_logps", "fused_linear_sequence_logps", "fused_linear_token_logps",
                                           "cu_seqlens_from_position_ids", "shift_packed_labels",
                                           "logit_options_from_config", "preference_loss", "PreferenceLoss",
                                           "focal_po_loss", "fused_linear_focal_po_loss", "FocalPOLoss",
                                           "FusedLinearFocalPOLoss"}
    undocumented = {name: _check_signature(name, params) for name, params in calls}
    # "both take vocab_parallel_group=None, sequence_parallel_group=None ..., as do focal_po_loss and
    # fused_linear_focal_po_loss below (their modules take them as options)"
    for name in ("sequence_logps", "fused_linear_sequence_logps"):
        assert set(undocumented[name]) == {"vocab_parallel_group", "sequence_parallel_group"}, name
    for name in ("sequence_logps", "fused_linear_sequence_logps", "focal_po_loss", "fused_linear_focal_po_loss"):
        params = inspect.signature(getattr(fk, name)).parameters
        assert params["vocab_parallel_group"].default is None and params["sequence_parallel_group"].default is None
    for module in (fk.FocalPOLoss(), fk.FusedLinearFocalPOLoss()):
        assert {"vocab_parallel_group", "sequence_parallel_group"} <= set(module.options), type(module).__name__

    # Fields and names the listing promises.
    token_fields = re.search(r"TokenLogps\(([^)]*)\)", code).group(1)
    assert fk.TokenLogps._fields == tuple(f.strip() for f in token_fields.split(","))
    out_fields = set(re.findall(r"\bout\.(\w+)", code)) - {"loss_type"}
    assert out_fields <= set(fk.PreferenceLossOutput._fields) and "metrics" in out_fields
    reference_names = re.search(r"fk\.reference\s*#[^:]*:(.*)$", code, re.M).group(1)  # "spec: a (x), b, c"
    for name in re.sub(r"\([^)]*\)", "", reference_names).split(","):
        assert callable(getattr(fk.reference, name.strip())), name
    assert callable(fk.cu_seqlens_from_position_ids) and callable(fk.shift_packed_labels)

    # The output's promises, on a small call: scalar loss / (B,) for reduction="none", detached rewards.
    cl, rl, cy, ry = _pair_batch(2, 5, 4, seed=10)
    out = fk.focal_po_loss(cl, rl, cy, ry, torch.tensor([-20.0, -21.0]), torch.tensor([-19.0, -22.0]))
    assert out.loss.dim() == 0 and out.chosen_logps.shape == out.chosen_rewards.shape == (2,)
    assert out.chosen_logps.requires_grad and not out.chosen_rewards.requires_grad
    assert torch.autograd.grad(out.loss, out.chosen_logps)[0].shape == (2,)  # a genuine input of the loss
    assert fk.focal_po_loss(cl, rl, cy, ry, reduction="none").loss.shape == (2,)
    assert {"rewards/chosen", "rewards/accuracies", "logps/chosen"} <= set(out.metrics)


# ---------------------------------------------------------------------------------------------------------------
# "Preference losses on per-sequence log-probs"


def test_preference_loss_module():
    chosen_logits, rejected_logits, chosen_labels, rejected_labels = _pair_batch(2, 5, 6, seed=11, prompt_len=2)
    ref_chosen_logps, ref_rejected_logps = torch.tensor([-20.0, -21.0]), torch.tensor([-19.0, -22.0])

    ns = run(block(*README_BLOCKS[9]), chosen_logits=chosen_logits, rejected_logits=rejected_logits,
             chosen_labels=chosen_labels, rejected_labels=rejected_labels, ref_chosen_logps=ref_chosen_logps,
             ref_rejected_logps=ref_rejected_logps)

    c, r = reference_logps(chosen_logits, chosen_labels), reference_logps(rejected_logits, rejected_labels)
    z = 0.1 * ((c - ref_chosen_logps.double()) - (r - ref_rejected_logps.double()))
    sft = -c.sum() / (chosen_labels != -100).sum()  # the batch token mean of the chosen NLL
    assert_close(ns["out"].loss, (-F.logsigmoid(z)).mean() + 0.1 * sft)
    assert chosen_logits.grad is not None and rejected_logits.grad is not None
    assert set(ns["logs"]) == set(ns["out"].metrics) and all(isinstance(v, float) for v in ns["logs"].values())
    # The table of loss types lists every name of fk.LOSS_TYPES, and no other.
    section = README.read_text().split("### Preference losses on per-sequence log-probs")[1]
    assert set(re.findall(r"^\| `(\w+)`", section, re.M)) - {"loss_type"} == set(fk.LOSS_TYPES)  # less the header
