"""Bad input gets a clear error naming the argument, raised before any kernel runs."""

import pytest
import torch

import focal_kernels as fk


def _inputs(device, batch=2, seq_len=3, vocab=10):
    return dict(
        chosen_logits=torch.randn(batch, seq_len, vocab, device=device),
        rejected_logits=torch.randn(batch, seq_len + 1, vocab, device=device),
        chosen_labels=torch.randint(0, vocab, (batch, seq_len), device=device),
        rejected_labels=torch.randint(0, vocab, (batch, seq_len + 1), device=device),
    )


def _call(fn, device, **changes):
    kwargs = _inputs(device)
    kwargs.update(changes)
    return fn(**kwargs)


IMPLEMENTATIONS = [fk.focal_po_loss, fk.reference.focal_po_loss]


@pytest.mark.parametrize("fn", IMPLEMENTATIONS, ids=["kernels", "reference"])
@pytest.mark.parametrize("changes, error, pattern", [
    (lambda d: {"chosen_labels": torch.tensor([[0, 1, 10], [0, 1, 2]], device=d)}, ValueError,
     r"chosen_labels must be in \[0, 10\).*found 10"),
    (lambda d: {"rejected_labels": torch.tensor([[0, -5, 1, 2], [0, 1, 2, 3]], device=d)}, ValueError,
     r"rejected_labels must be in \[0, 10\).*found -5"),
    (lambda d: {"chosen_labels": torch.zeros(2, 4, dtype=torch.long, device=d)}, ValueError,
     r"chosen_labels must have shape \(B, T\) = \(2, 3\)"),
    (lambda d: {"rejected_logits": torch.randn(3, 4, 10, device=d),
                "rejected_labels": torch.zeros(3, 4, dtype=torch.long, device=d)}, ValueError, r"same batch size"),
    (lambda d: {"rejected_logits": torch.randn(2, 4, 11, device=d)}, ValueError, r"same last dimension"),
    (lambda d: {"rejected_logits": torch.randn(2, 4, 10, device=d, dtype=torch.float64)}, TypeError,
     r"chosen_logits and rejected_logits must have the same dtype"),
    (lambda d: {"chosen_labels": torch.zeros(2, 3, device=d)}, TypeError, r"chosen_labels must be an int64 or int32"),
    (lambda d: {"chosen_logits": torch.zeros(2, 3, 10, dtype=torch.long, device=d)}, TypeError,
     r"chosen_logits must be a floating-point tensor"),
    (lambda d: {"chosen_logits": torch.randn(2, 3, device=d)}, ValueError,
     r"chosen_logits must have shape \(B, T, V\)"),
    (lambda d: {"gamma": -0.1}, ValueError, r"gamma must be (a finite number )?>= 0"),
    (lambda d: {"beta": 0.0}, ValueError, r"beta must be (a finite number )?> 0"),
    (lambda d: {"beta": -1.0}, ValueError, r"beta must be (a finite number )?> 0"),
    (lambda d: {"beta": float("nan")}, ValueError, r"beta must be (a )?finite"),
    (lambda d: {"gamma": float("inf")}, ValueError, r"gamma must be (a )?finite"),
    (lambda d: {"ref_chosen_logps": torch.zeros(2, 1, device=d), "ref_rejected_logps": torch.zeros(2, device=d)},
     ValueError, r"ref_chosen_logps must have shape \(B,\) = \(2,\)"),
    (lambda d: {"ref_chosen_logps": torch.zeros(2, device=d), "ref_rejected_logps": torch.zeros(3, device=d)},
     ValueError, r"ref_rejected_logps must have shape"),
    (lambda d: {"ref_chosen_logps": torch.zeros(2, device=d)}, ValueError,
     r"ref_chosen_logps was given but ref_rejected_logps is None"),
    (lambda d: {"ref_chosen_logps": torch.zeros(2, device=d), "ref_rejected_logps": [0.0, 0.0]}, TypeError,
     r"ref_rejected_logps must be a torch.Tensor"),
    (lambda d: {"reduction": "avg"}, ValueError, r"reduction must be one of"),
    (lambda d: {"chosen_labels": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError,
     r"chosen_labels is on meta"),
    (lambda d: {"rejected_logits": torch.randn(2, 4, 10, device="meta"),
                "rejected_labels": torch.zeros(2, 4, dtype=torch.long, device="meta")}, ValueError,
     r"rejected_logits is on meta"),
    (lambda d: {"ref_chosen_logps": torch.zeros(2, device="meta"), "ref_rejected_logps": torch.zeros(2, device=d)},
     ValueError, r"ref_chosen_logps is on meta"),
    (lambda d: {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    (lambda d: {"beta": torch.tensor(0.1)}, (TypeError, ValueError), r"beta must be"),
    (lambda d: {"detach_focal_weight": "no"}, TypeError, r"detach_focal_weight must be (True or False|a bool)"),
])
def test_bad_input_raises_named_error(device, fn, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(fn, device, **changes(device))


def test_errors_are_raised_before_any_kernel(device, monkeypatch):
    from focal_kernels.logprobs import ops

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(ops, "token_logps", forbidden)
    with pytest.raises(ValueError, match="chosen_labels must be in"):
        _call(fk.focal_po_loss, device, chosen_labels=torch.full((2, 3), 99, device=device))


def test_misspelt_keywords_are_named_with_a_suggestion(device):
    """The fused losses take the loss options as **kwargs: a misspelt keyword (theirs or an option's) is named with
    the closest one; the other fused loss's keyword is named as that; one like none lists the loss options."""
    for typo, meant in (("gama", "gamma"), ("los_type", "loss_type"), ("redution", "reduction")):
        with pytest.raises(TypeError, match=rf"\['{typo}'\] \(did you mean '{meant}'\?\)"):
            _call(fk.focal_po_loss, device, **{typo: 0.1})
    inputs = _inputs(device)
    hidden = [torch.randn(*inputs[f"{side}_labels"].shape, 4, device=device) for side in ("chosen", "rejected")]
    with pytest.raises(TypeError, match=r"\['temprature'\] \(did you mean 'temperature'\?\)"):
        fk.fused_linear_focal_po_loss(*hidden, torch.randn(10, 4, device=device), inputs["chosen_labels"],
                                      inputs["rejected_labels"], temprature=2.0)
    with pytest.raises(TypeError, match=r"\['xyzzy'\]; besides its named keywords, .*'f_divergence_type'"):
        _call(fk.focal_po_loss, device, xyzzy=1)
    # a keyword of the other fused loss is named as such (not suggested as itself)
    with pytest.raises(TypeError, match=r"\['chunk_size'\] \('chunk_size' is an option of fused_linear_focal_po_loss, "
                                        r"not of focal_po_loss\)"):
        _call(fk.focal_po_loss, device, chunk_size=1024)
    with pytest.raises(TypeError, match=r"\['inplace_backwards'\]; besides"):  # only the function's own keywords
        fk.fused_linear_focal_po_loss(*hidden, torch.randn(10, 4, device=device), inputs["chosen_labels"],
                                      inputs["rejected_labels"], inplace_backwards=True)


def test_sequence_logps_errors(device):
    cu_seqlens = torch.tensor([0, 1, 2], device=device)  # passed by position, it lands in ignore_index
    hint = r"ignore_index must be an int, got Tensor \(if this is cu_seqlens: it is keyword-only"
    with pytest.raises(TypeError, match=hint):
        fk.sequence_logps(torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device), cu_seqlens)
    with pytest.raises(TypeError, match=hint):
        fk.fused_linear_sequence_logps(torch.randn(2, 3, device=device), torch.randn(5, 3, device=device),
                                       torch.tensor([0, 1], device=device), None, cu_seqlens)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got Tensor$"):  # a scalar tensor: no hint
        fk.sequence_logps(torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device),
                          ignore_index=torch.tensor(-100, device=device))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        fk.sequence_logps(torch.randn(1, 2, 5, device=device), torch.tensor([[0, 5]], device=device))
    with pytest.raises(ValueError, match=r"at least one sequence"):
        fk.sequence_logps(torch.randn(0, 2, 5, device=device), torch.zeros(0, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"non-empty vocabulary"):
        fk.sequence_logps(torch.randn(1, 2, 0, device=device), torch.zeros(1, 2, dtype=torch.long, device=device))


@pytest.mark.parametrize("ignore_index", [2**32, 2**31, -2**31 - 1, 2**40 + 3])
def test_ignore_index_beyond_int32_labels(device, ignore_index):
    """int32 labels compared with an ignore_index outside int32 would wrap onto real ids (2**32 onto 0):
    refused, naming both; int64 labels take it (no label equals it: every token scored)."""
    logits = torch.randn(2, 3, 5, device=device)
    hidden, weight = torch.randn(2, 3, 4, device=device), torch.randn(5, 4, device=device)
    labels = torch.tensor([[0, 1, 2], [0, 0, 4]], device=device)
    for call in (lambda y: fk.sequence_logps(logits, y, ignore_index),
                 lambda y: fk.fused_linear_sequence_logps(hidden, weight, y, ignore_index=ignore_index),
                 lambda y: fk.focal_po_loss(logits, logits, y, y, ignore_index=ignore_index)):
        with pytest.raises(ValueError, match=rf"ignore_index={ignore_index} does not fit in \w*labels's dtype int32"):
            call(labels.to(torch.int32))
    logps, counts = fk.sequence_logps(logits, labels, ignore_index, return_token_counts=True)
    assert counts.tolist() == [3, 3]
    torch.testing.assert_close(logps, fk.reference.sequence_logps(logits.double(), labels).float())


def test_module_validates_options_at_construction_and_call(device):
    with pytest.raises(ValueError, match="gamma"):
        fk.FocalPOLoss(gamma=-1.0)
    loss = fk.FocalPOLoss()
    loss.gamma = -1.0  # an attribute changed after construction is checked at the call
    with pytest.raises(ValueError, match="gamma"):
        loss(**_inputs(device))


@pytest.mark.parametrize("module, options, error, words", [
    ("FocalPOLoss", dict(loss_type="nope"), ValueError, "Unknown loss_type"),
    ("FocalPOLoss", dict(label_smoothing=0.1), ValueError, "label_smoothing"),
    # a loss type's own option, that type not selected: refused, never ignored
    ("FocalPOLoss", dict(loss_type="sigmoid", gamma=2.0), ValueError, "gamma=2.0 is read only by the 'focal'"),
    ("FocalPOLoss", dict(loss_type="ipo", detach_focal_weight=True), ValueError, "detach_focal_weight=True"),
    ("FocalPOLoss", dict(loss_type="focal", simpo_gamma=1.0), ValueError, "read only by the 'simpo'"),
    ("FocalPOLoss", dict(loss_type=["focal", "sigmoid"], discopop_tau=0.1), ValueError, "'discopop'"),
    ("FocalPOLoss", dict(f_alpha_divergence_coef=0.3), ValueError, "f_divergence_type='alpha_divergence'"),
    ("FocalPOLoss", dict(chunk_size=8), TypeError, "unexpected keyword argument(s) ['chunk_size'] ('chunk_size' is "
                                                   "an option of FusedLinearFocalPOLoss, not of FocalPOLoss)"),
    ("FocalPOLoss", dict(gama=0.1), TypeError, "['gama'] (did you mean 'gamma'?)"),
    ("FocalPOLoss", dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ("FocalPOLoss", dict(inplace_backward=1), TypeError, "inplace_backward"),
    ("FocalPOLoss", dict(reduction="avg"), ValueError, "reduction"),
    ("FusedLinearFocalPOLoss", dict(chunk_size=0), ValueError, "chunk_size"),
    ("FusedLinearFocalPOLoss", dict(logit_softcap=-1.0), ValueError, "logit_softcap"),
    ("FusedLinearFocalPOLoss", dict(memory_budget=1.5), TypeError, "memory_budget"),
    ("FusedLinearFocalPOLoss", dict(validate_labels="yes"), TypeError, "validate_labels"),
    ("FusedLinearFocalPOLoss", dict(inplace_backward=True), TypeError,
     "['inplace_backward'] ('inplace_backward' is an option of FocalPOLoss, not of FusedLinearFocalPOLoss)"),
])
def test_module_refuses_bad_options_at_construction(module, options, error, words):
    with pytest.raises(error) as caught:
        getattr(fk, module)(**options)
    assert words in str(caught.value)


def test_hidden_path_option_types():
    hidden, weight = torch.randn(1, 2, 3), torch.randn(5, 3)
    labels = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="memory_budget must be None or an int"):
        fk.fused_linear_sequence_logps(hidden, weight, labels, memory_budget=1.5)
    with pytest.raises(TypeError, match=r"stats=\('entropy',\)"):
        fk.fused_linear_token_logps(hidden, weight, labels, stats="entropy")
    # flattened hidden states (N, H) take labels of any shape with N elements: outputs in the labels' shape
    flat, grid = torch.randn(4, 3), torch.randint(0, 5, (2, 2))
    torch.testing.assert_close(fk.fused_linear_token_logps(flat, weight, grid).log_probs,
                               fk.fused_linear_token_logps(flat.view(2, 2, 3), weight, grid).log_probs)


def test_inplace_backward_needs_contiguous_vocabulary(device):
    logits = torch.randn(2, 10, 3, device=device).transpose(1, 2)  # (2, 3, 10), stride(-1) == 3
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    assert torch.isfinite(fk.sequence_logps(logits, labels)).all()  # copied once, without inplace
    from focal_kernels import backend
    if backend.use_triton(logits):
        with pytest.raises(ValueError, match="inplace_backward=True needs logits whose last dimension"):
            fk.sequence_logps(logits, labels, inplace_backward=True)


def test_inplace_backward_refuses_overlapping_logits(device):
    from focal_kernels import backend

    base = torch.randn(1, 3, 10, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    if not backend.use_triton(base):
        return  # the PyTorch path ignores inplace_backward
    with pytest.raises(ValueError, match="do not overlap in memory"):
        fk.sequence_logps(base.expand(2, 3, 10), labels, inplace_backward=True)
    logits = torch.randn(2, 3, 10, device=device)
    with pytest.raises(ValueError, match="chosen_logits and rejected_logits that do not overlap"):
        fk.focal_po_loss(logits, logits, labels, labels, inplace_backward=True)
    both = torch.randn(4, 3, 10, device=device)  # chosen and rejected as halves of one batch: fine
    fk.focal_po_loss(both[:2], both[2:], labels, labels, inplace_backward=True)
    along_t = torch.randn(2, 7, 10, device=device)  # halves of each sequence: rows interleave, none shared
    fk.focal_po_loss(along_t[:, :3], along_t[:, 3:6], labels, labels, inplace_backward=True)
    with pytest.raises(ValueError, match="chosen_logits and rejected_logits that do not overlap"):  # one row shared
        fk.focal_po_loss(along_t[:, :3], along_t[:, 2:5], labels, labels, inplace_backward=True)
    flat = torch.randn(2 * 3 * 10 + 5, device=device)  # rows sharing part of their elements
    with pytest.raises(ValueError, match="chosen_logits and rejected_logits that do not overlap"):
        fk.focal_po_loss(flat[:60].view(2, 3, 10), flat[5:65].view(2, 3, 10), labels, labels, inplace_backward=True)


def test_inplace_backward_over_logits_another_op_saved_fails_loudly(device):
    from focal_kernels import backend

    raw = torch.randn(2, 3, 10, device=device, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    if not backend.use_triton(raw):
        return
    logits = torch.tanh(raw)  # tanh saves its output for its backward
    logps = fk.sequence_logps(logits, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logps.sum().backward()


def test_double_backward_raises(device):
    logits = torch.randn(2, 3, 10, device=device, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    from focal_kernels import backend
    if not backend.use_triton(logits):
        return
    out = fk.focal_po_loss(logits, logits.detach().clone(), labels, labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, [logits], create_graph=True)


def test_numpy_numbers_and_flags(device):
    """NumPy scalars are numbers like any other; inplace_backward must be a bool."""
    np = pytest.importorskip("numpy")
    inputs = _inputs(device)
    out = fk.focal_po_loss(**inputs, beta=np.float32(0.5), gamma=np.float64(0.05), ignore_index=np.int64(-100))
    torch.testing.assert_close(out.loss, fk.focal_po_loss(**inputs, beta=float(np.float32(0.5)), gamma=0.05).loss)
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        _call(fk.focal_po_loss, device, inplace_backward=1)
    with pytest.raises(TypeError, match=r"inplace_backward must be True or False \(a Python bool\), got .* numpy"):
        _call(fk.focal_po_loss, device, inplace_backward=np.bool_(True))  # (its repr may read True)
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        fk.sequence_logps(torch.randn(1, 2, 5, device=device), torch.zeros(1, 2, dtype=torch.long, device=device),
                          inplace_backward=None)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain-cpu"])
def test_inplace_checks_run_on_every_backend(device, kernels, monkeypatch):
    """The plain-CPU path ignores inplace_backward, but refuses what the kernels would refuse."""
    from focal_kernels import backend

    if not kernels:
        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    leaf = torch.randn(2, 3, 10, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="a leaf tensor that requires grad"):
        fk.sequence_logps(leaf, labels, inplace_backward=True)
    with pytest.raises(ValueError, match="a leaf tensor that requires grad"):  # a view of the leaf, too
        fk.sequence_logps(torch.randn(2, 4, 10, device=device, requires_grad=True)[:, :-1], labels,
                          inplace_backward=True)
    with pytest.raises(ValueError, match="a leaf tensor that requires grad"):  # a view that is a leaf itself
        fk.sequence_logps(torch.randn(2, 4, 10, device=device)[:, :-1].requires_grad_(), labels, inplace_backward=True)
    with pytest.raises(ValueError, match="do not overlap in memory"):
        fk.sequence_logps(torch.randn(1, 3, 10, device=device).expand(2, 3, 10), labels, inplace_backward=True)
    both = torch.randn(2, 3, 10, device=device)
    with pytest.raises(ValueError, match="chosen_logits and rejected_logits that do not overlap"):
        fk.focal_po_loss(both, both, labels, labels, inplace_backward=True)


def test_loss_tensor_errors_come_before_any_kernel(device, monkeypatch):
    """A reference-free loss given references, or pair_weights of the wrong length, is refused before the
    log-prob kernels (or GEMMs) run."""
    from focal_kernels.logprobs import ops

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    for name in ("token_logps", "linear_forward"):
        monkeypatch.setattr(ops, name, forbidden)
    inputs = _inputs(device)
    refs = torch.zeros(2, device=device), torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="reference-free"):
        _call(fk.focal_po_loss, device, ref_chosen_logps=refs[0], ref_rejected_logps=refs[1], loss_type="simpo")
    with pytest.raises(ValueError, match="pair_weights must have shape"):
        _call(fk.focal_po_loss, device, pair_weights=torch.ones(3, device=device))
    hidden = torch.randn(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="pair_weights must have shape"):
        fk.fused_linear_focal_po_loss(hidden, hidden, torch.randn(10, 4, device=device), inputs["chosen_labels"],
                                      inputs["chosen_labels"], pair_weights=torch.ones(3, device=device))


def test_signature_defaults_are_the_checked_defaults():
    """An option that no selected loss type reads is refused unless at its default (losses/validation.py):
    every public signature must default it to that same value, or its own default would be refused."""
    import inspect

    from focal_kernels.losses.validation import OPTION_DEFAULTS

    seen = set()
    for fn in (fk.preference_loss, fk.focal_po_loss, fk.fused_linear_focal_po_loss, fk.FocalPOLoss.__init__,
               fk.FusedLinearFocalPOLoss.__init__, fk.PreferenceLoss.__init__):
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in OPTION_DEFAULTS:
                assert parameter.default == OPTION_DEFAULTS[name], (fn.__qualname__, name)
                seen.add(name)
    assert seen == set(OPTION_DEFAULTS)
    from focal_kernels.losses import LossOptions  # its defaults too (for a user's own loss function's tests)

    for name, default in LossOptions._field_defaults.items():
        assert name == "beta" or default == OPTION_DEFAULTS[name], name


def test_dtensors_where_plain_tensors_are_expected_raise(one_rank_mesh):
    """A DTensor reference log-prob, count, pair weight, cu_seqlens or packing input failed deep inside PyTorch
    ("mixed torch.Tensor and DTensor", a sharding propagation error); it raises naming the argument."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    def dt(tensor):
        return distribute_tensor(tensor, one_rank_mesh["tp"], [Replicate()])

    logps = torch.randn(2)
    pair = dict(chosen_logps=logps, rejected_logps=torch.randn(2), ref_chosen_logps=torch.randn(2),
                ref_rejected_logps=torch.randn(2), chosen_token_counts=torch.ones(2),
                rejected_token_counts=torch.ones(2), pair_weights=torch.ones(2))
    for name in pair:  # one DTensor among plain tensors
        with pytest.raises(TypeError, match=f"{name} is a DTensor"):
            fk.preference_loss(**{**pair, name: dt(pair[name])}, loss_type="ipo")
    # DTensors for every argument (replicated log-probs) compute, as before: a DTensor loss, the same value
    everywhere = fk.preference_loss(**{name: dt(tensor) for name, tensor in pair.items()}, loss_type="ipo")
    torch.testing.assert_close(everywhere.loss.full_tensor(), fk.preference_loss(**pair, loss_type="ipo").loss)
    with pytest.raises(TypeError, match="ref_chosen_logps is a DTensor"):
        _call(fk.focal_po_loss, "cpu", ref_chosen_logps=dt(torch.randn(2)), ref_rejected_logps=torch.randn(2))
    with pytest.raises(TypeError, match="pair_weights is a DTensor"):
        _call(fk.focal_po_loss, "cpu", pair_weights=dt(torch.ones(2)))
    tokens, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    with pytest.raises(TypeError, match="cu_seqlens is a DTensor"):
        fk.sequence_logps(tokens, labels, cu_seqlens=dt(torch.tensor([0, 2, 5])))
    position_ids = torch.tensor([0, 1, 0, 1, 2])
    with pytest.raises(TypeError, match="position_ids is a DTensor"):
        fk.cu_seqlens_from_position_ids(dt(position_ids))
    cu = torch.tensor([0, 2, 5])
    for arguments, name in (((dt(labels), cu), "input_ids"), ((labels, dt(cu)), "cu_seqlens"),
                            ((labels, cu, -100, dt(labels)), "labels")):
        with pytest.raises(TypeError, match=f"{name} is a DTensor"):
            fk.shift_packed_labels(*arguments)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):  # (before: an error about labels)
        fk.shift_packed_labels(labels.tolist(), cu, labels=labels)


@pytest.mark.parametrize("transform, path", [
    (transform, path) for transform in ("grad", "vmap")
    for path in ("logits", "packed", "hidden", "weight", "labels", "focal_po_loss")
    if (transform, path) != ("grad", "labels")])  # labels take no gradient
def test_torch_func_transforms_are_refused_by_name(device, transform, path):
    """torch.func cannot transform the kernels' autograd Functions (no setup_context form, no vmap rule): the
    transform's tensor is named instead of failing inside PyTorch or the interpreter's probe; the pair losses,
    plain PyTorch, still work under it."""
    x = torch.randn(2, 5, 11, device=device, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), device=device)
    weight = torch.randn(11, 8, device=device, dtype=torch.float64)
    hidden = torch.randn(2, 5, 8, device=device, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 4, 10], device=device)
    calls = {
        "logits": (lambda t: fk.sequence_logps(t, labels), x, "logits"),
        "packed": (lambda t: fk.sequence_logps(t, labels.reshape(-1), cu_seqlens=cu_seqlens),
                   x.reshape(10, 11), "logits"),
        "hidden": (lambda t: fk.fused_linear_sequence_logps(t, weight, labels), hidden, "hidden"),
        "weight": (lambda t: fk.fused_linear_sequence_logps(hidden, t, labels), weight, "weight"),
        "labels": (lambda t: fk.sequence_logps(x, t), labels, "labels"),
        "focal_po_loss": (lambda t: fk.focal_po_loss(t, t, labels, labels).loss, x, "chosen_logits"),
    }
    fn, argument, name = calls[path]
    if transform == "grad":
        call = lambda: torch.func.grad(lambda t: fn(t).sum())(argument)  # noqa: E731
    else:
        call = lambda: torch.vmap(fn)(argument.unsqueeze(0).expand(3, *argument.shape))  # noqa: E731
    with pytest.raises(NotImplementedError, match=rf"^{name} is a torch\.func transform's tensor"):
        call()
    chosen = torch.randn(3, device=device, dtype=torch.float64)
    grads = torch.func.grad(lambda c: fk.preference_loss(c, c.flip(0), c * 0, c * 0, gamma=0.5).loss)(chosen)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
