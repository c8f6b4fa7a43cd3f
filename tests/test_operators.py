"""The kernels' PyTorch operators: fake (meta) implementations that agree with the real ones in shape, dtype
and strides (torch.compile plans memory from the fakes; inductor checks them), for non-contiguous inputs."""

import pytest
import torch
from conftest import DEVICE

from focal_kernels.logprobs import ops

CHECKS = ("test_schema", "test_faketensor")


def _logits_case():
    logits = torch.randn(5, 3, 11, device=DEVICE).transpose(0, 1)  # (3, 5, 11), batch stride < time stride
    labels = torch.randint(0, 11, (3, 5), device=DEVICE)
    labels[0, 0] = -100
    _, row_max, log_sum_exp = ops._token_logps([logits], [labels], -100, 0, False)
    return logits, labels, row_max, log_sum_exp


def test_logits_path_operators():
    logits, labels, row_max, log_sum_exp = _logits_case()
    per_sequence = torch.randn(3, 1, device=DEVICE).expand(3, 5)  # time stride 0, as autograd passes it
    torch.library.opcheck(ops._token_logps_op, ([logits], [labels], -100, 0, False), test_utils=CHECKS)
    torch.library.opcheck(ops._token_logps_op, ([logits], [labels], -100, 4, True), test_utils=CHECKS)
    torch.library.opcheck(ops._logits_grad_op, ([logits], [labels], row_max, log_sum_exp, [per_sequence], -100, 0),
                          test_utils=CHECKS)
    offsets = torch.tensor([0, 2, 2, 7], device=DEVICE)
    torch.library.opcheck(ops._segment_sum_op, (torch.randn(7, device=DEVICE), offsets, [3], [2]),
                          test_utils=CHECKS)
    torch.library.opcheck(ops._segment_sum_op, (torch.randn(11, device=DEVICE), None, [2, 1], [4, 3]),
                          test_utils=CHECKS)


def test_pair_operators():
    """Chosen and rejected in one launch: two grids of different lengths, strides and label dtypes."""
    chosen, labels_c, _, _ = _logits_case()
    rejected = torch.randn(3, 2, 16, device=DEVICE)[:, :, :11]  # (3, 2, 11) with a row stride of 16
    labels_r = torch.randint(0, 11, (3, 2), device=DEVICE, dtype=torch.int32)
    sides = ([chosen, rejected], [labels_c, labels_r])
    torch.library.opcheck(ops._token_logps_op, (*sides, -100, 0, False), test_utils=CHECKS)
    _, row_max, log_sum_exp = ops._token_logps(*sides, -100, 0, False)
    assert row_max.shape == (3 * 5 + 3 * 2,)
    scales = [torch.randn(3, 1, device=DEVICE).expand(3, 5), torch.randn(3, 1, device=DEVICE).expand(3, 2)]
    torch.library.opcheck(ops._logits_grad_op, (*sides, row_max, log_sum_exp, scales, -100, 0), test_utils=CHECKS)
    inplace = ([chosen.clone(), rejected.clone()], sides[1], row_max, log_sum_exp, scales, -100, 0, None)
    torch.library.opcheck(ops._logits_grad_inplace_op, inplace, test_utils=CHECKS)  # places: opcheck copies
    torch.library.opcheck(ops._storage_places_op, (sides[0],), test_utils=CHECKS)


def test_inplace_operator_writes_where_the_forward_read():
    """The compiled in-place backward's guard against a mutated view handed over at another storage offset
    (inductor, symbolic offsets): the gradient lands on the rows the forward recorded; a copy of the storage at
    the recorded offset is written as given, one at another offset refused."""
    logits = torch.randn(4, 3, 11, device=DEVICE)
    copy = logits.clone()
    labels = torch.randint(0, 11, (2, 3), device=DEVICE)
    second = logits[2:]
    places = ops._storage_places([second])
    assert places.tolist() == [[logits.untyped_storage().data_ptr(), 2 * 3 * 11]]
    _, row_max, log_sum_exp = ops._token_logps([second], [labels], -100, 0, False)
    scale = torch.ones(2, 3, device=DEVICE)
    (expected,) = ops._logits_grad([second], [labels], row_max, log_sum_exp, [scale], -100, 0)
    first_half = logits[:2].clone()
    ops._checked_logits_grad_inplace([logits[:2]], [labels], row_max, log_sum_exp, [scale], -100, 0, places)
    torch.testing.assert_close(logits[2:], expected)
    torch.testing.assert_close(logits[:2], first_half)  # untouched
    # a copy of the whole storage (a compiler's functional copy) at the recorded offset: written as given
    ops._checked_logits_grad_inplace([copy[2:]], [labels], row_max, log_sum_exp, [scale], -100, 0, places)
    torch.testing.assert_close(copy[2:], expected)
    with pytest.raises(RuntimeError, match="other memory, at another storage offset"):
        ops._checked_logits_grad_inplace([copy[:2]], [labels], row_max, log_sum_exp, [scale], -100, 0, places)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)])
def test_hidden_path_operators(dtype, needs):
    rows = torch.randn(6, 4, device=DEVICE).to(dtype)
    weight = torch.randn(4, 9, device=DEVICE).to(dtype).t()  # a transposed (V, H) weight
    bias = torch.randn(9, device=DEVICE).to(dtype)
    labels = torch.randint(0, 9, (6,), device=DEVICE)
    params = torch.tensor([1.5, 3.0, 0.5], device=DEVICE)
    forward = (rows, weight, bias, labels, params, True, 0, 4, "entropy,is_top1", not needs[1], 1)
    torch.library.opcheck(ops._linear_forward_op, forward, test_utils=CHECKS)
    state = ops._linear_forward(*forward)
    backward = (rows, weight, bias, labels, state[0], torch.log(state[1]), torch.randn(6, device=DEVICE), params,
                True, 0, 4, *needs, None)
    torch.library.opcheck(ops._linear_backward_op, backward, test_utils=CHECKS)


def test_meta_tensors_give_shapes_forward_and_backward():
    """Meta tensors (shape inference without data) through every single-device entry point, forward and backward:
    the label checks read no values there (they raised "Cannot copy out of meta tensor"), the hidden-state path
    projects every token (no data-dependent selection) and turns no autocast off (torch.autocast refused the meta
    device). Results and gradients have the shapes, dtypes and device of a real call."""
    import focal_kernels as fk

    def meta(*shape, dtype=torch.float32, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    B, T, V, H = 2, 5, 11, 8
    logits, hidden, weight = meta(B, T, V, grad=True), meta(B, T, H, grad=True), meta(V, H, grad=True)
    labels, cu = meta(B, T, dtype=torch.int64), meta(3, dtype=torch.int64)
    calls = {
        "logits": lambda: fk.sequence_logps(logits, labels),
        "packed": lambda: fk.sequence_logps(logits.reshape(B * T, V), labels.reshape(-1), cu_seqlens=cu),
        "hidden": lambda: fk.fused_linear_sequence_logps(hidden, weight, labels),
        "hidden packed": lambda: fk.fused_linear_sequence_logps(hidden.reshape(B * T, H), weight, labels.reshape(-1),
                                                                cu_seqlens=cu),
        "frozen": lambda: fk.fused_linear_sequence_logps(hidden, weight.detach(), labels),
        "budget": lambda: fk.fused_linear_sequence_logps(hidden, weight, labels, memory_budget=2**20),
        "statistics": lambda: fk.fused_linear_token_logps(hidden, weight, labels, stats=("entropy",)).entropy,
        "pair": lambda: fk.focal_po_loss(logits, logits, labels, labels.clone()).loss,
        "pair in place": lambda: fk.focal_po_loss(logits * 1, logits * 1, labels, labels, inplace_backward=True).loss,
        "hidden pair": lambda: fk.fused_linear_focal_po_loss(hidden, hidden, weight, labels, labels.clone()).loss,
    }
    # else (B,), or (S,) = (2,) packed
    shapes = {"statistics": (B, T), "pair": (), "pair in place": (), "hidden pair": ()}
    for name, call in calls.items():
        out = call()
        assert out.device.type == "meta" and out.dtype == torch.float32, name
        assert tuple(out.shape) == shapes.get(name, (cu.shape[0] - 1,) if "packed" in name else (B,)), name
        if out.requires_grad:
            grads = torch.autograd.grad(out.sum(), [t for t in (logits, hidden, weight) if t.requires_grad],
                                        allow_unused=True)
            assert all(g is None or g.device.type == "meta" for g in grads), name
    with pytest.raises(ValueError, match="meta"):  # its output length depends on the values
        fk.cu_seqlens_from_position_ids(meta(7, dtype=torch.int64))
