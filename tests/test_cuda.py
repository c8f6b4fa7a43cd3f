"""GPU-only properties: launches on the tensors' own device (two GPUs), and CUDA-graph capture of forward and
backward replaying what eager computes. These need the hardware they test; on a CPU-only machine (CI) there is
nothing to run them on, so they are skipped there and run by benchmarks/gpu_check.sh on a lent GPU."""

import pytest
import torch

import focal_kernels as fk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _batch(device, vocab=1000, hidden=64, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(2, 7, vocab, device=device)
    labels = torch.randint(0, vocab, (2, 7), device=device)
    labels[:, :2] = -100
    h = torch.randn(2, 7, hidden, device=device)
    weight = torch.randn(vocab, hidden, device=device) * hidden ** -0.5
    cu_seqlens = torch.tensor([0, 5, 5, 14], device=device, dtype=torch.int32)  # made outside any capture
    return logits, labels, h, weight, cu_seqlens


def _everything(logits, labels, h, weight, cu_seqlens):
    """Both paths, packed and padded, forward and backward."""
    logits, h, weight = (t.detach().requires_grad_(True) for t in (logits, h, weight))
    out = fk.focal_po_loss(logits, logits.detach() * 0.5, labels, labels)
    packed = fk.sequence_logps(logits.reshape(14, -1), labels.reshape(14), cu_seqlens=cu_seqlens)
    linear = fk.fused_linear_sequence_logps(h, weight, labels, logit_softcap=3.0)
    total = out.loss + packed.sum() + linear.sum()
    return (out.loss, packed, linear, *torch.autograd.grad(total, [logits, h, weight]))


@two_gpus
def test_launches_on_the_tensors_device():
    expected = [t.cpu() for t in _everything(*_batch("cuda:0"))]
    with torch.cuda.device(0):  # cuda:0 current, tensors on cuda:1
        got = _everything(*_batch("cuda:1"))
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_graph_capture_replays_eager(monkeypatch):
    static = list(_batch("cuda", seed=0))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (kernels compiled, probes run) outside the capture
        for _ in range(2):
            _everything(*static)
        # The capture takes another path (no label check; the hidden-state path projects every token): run it
        # once too, so that no kernel variant is compiled, and loaded, while capturing.
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        _everything(*static)
        monkeypatch.undo()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _everything(*static)
    fresh = _batch("cuda", seed=1)  # new values (labels too) into the static inputs, then replay
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    expected = _everything(*fresh)
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
