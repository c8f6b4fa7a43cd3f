"""The digest of the hidden states' bits that vocabulary-parallel ranks compare (kernels/bits_digest.py and
its PyTorch twin) against a Python-integer reference, and what it must tell apart."""

import struct

import pytest
import torch
import torch._dynamo.testing

from focal_kernels.logprobs.agreement import hidden_digest, weighted_sum
from helpers import DTYPES

MASK = (1 << 64) - 1


def _splitmix_odd(z):
    """splitmix64's finalizer with arithmetic shifts on a two's-complement int64, as Python integers."""
    def signed(v):
        v &= MASK
        return v - (1 << 64) if v >> 63 else v

    z = signed(z * 0x9E3779B97F4A7C15)
    z = signed((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9)
    z = signed((z ^ (z >> 27)) * 0x94D049BB133111EB)
    return (z ^ (z >> 31)) | 1


def _words(value, dtype):
    """One element's bits as signed integers of at most 32 bits (float64: its low word, then its high word)."""
    if dtype == torch.bfloat16:  # the upper half of the float32 with the same value
        raw, width = struct.unpack("<I", struct.pack("<f", value))[0] >> 16, 2
    else:
        code, width = {torch.float16: ("e", 2), torch.float32: ("f", 4), torch.float64: ("d", 8)}[dtype]
        raw = int.from_bytes(struct.pack("<" + code, value), "little")
    words = [raw] if width <= 4 else [raw & 0xFFFFFFFF, raw >> 32]
    bits = 8 * min(width, 4)
    return [w - (1 << bits) if w >> (bits - 1) else w for w in words]


def _reference_digest(x):
    """Σ_{r, c} word[r, c] · mix(2c + 2) · mix(2r + 1) modulo 2^64, the bits read one element at a time."""
    flat = x.detach().cpu().reshape(-1, x.shape[-1])
    total = 0
    for r in range(flat.shape[0]):
        row = [w for c in range(flat.shape[1]) for w in _words(float(flat[r, c]), x.dtype)]
        for c, bits in enumerate(row):
            total += bits * _splitmix_odd(2 * c + 2) * _splitmix_odd(2 * r + 1)
    total &= MASK
    return total - (1 << 64) if total >> 63 else total


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 17, 3), (2, 2, 300)], ids=str)
def test_matches_python_integers(device, path, dtype, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 100).to(dtype)
    x[0, 0, 0] = -0.0
    expected = _reference_digest(x)
    actual = hidden_digest(x.to(device))
    assert actual.dtype == torch.int64 and actual.shape == () and actual.device.type == torch.device(device).type
    assert int(actual) == expected


def test_depends_on_bits_not_layout(device, path):
    base = torch.randn(3, 20, 7, dtype=torch.bfloat16, device=device)
    view = base.transpose(1, 2)[:, 1:6]  # (3, 5, 20), no unit stride anywhere
    assert int(hidden_digest(view)) == int(hidden_digest(view.contiguous()))
    assert int(hidden_digest(torch.empty(0, 4, 8, device=device))) == 0


def _swap(y, index, a, b):
    y[index + (a,)], y[index + (b,)] = y[index + (b,)].clone(), y[index + (a,)].clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_tells_apart(device, path, dtype):
    x = torch.randn(2, 6, 6, dtype=dtype, device=device)
    x[0, 2, 3] = 0.0
    digest = int(hidden_digest(x))
    assert int(hidden_digest(x.clone())) == digest
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    changes = {
        "one ulp": lambda y: y.view(bits)[1, 5, 0].add_(1),
        "-0.0 for 0.0": lambda y: y[0, 2, 3].fill_(-0.0),
        "two rows swapped": lambda y: _swap(y, (0,), 1, 4),
        "two columns swapped": lambda y: _swap(y, (slice(None), slice(None)), 0, 3),
        "transposed": lambda y: y.copy_(y.transpose(1, 2).clone()),
        "the two sequences swapped": lambda y: y.copy_(y.flip(0).clone()),
        "two signs flipped": lambda y: y[0, 1, :2].neg_(),  # (64-bit words: 2 · 2^63 ≡ 0 modulo 2^64)
        "four signs flipped": lambda y: y[1, 2:4, 4:].neg_(),
    }
    for what, change in changes.items():
        y = x.clone()
        change(y)
        assert not torch.equal(y.view(bits), x.view(bits)), what
        assert int(hidden_digest(y)) != digest, what
    nan = x.clone()
    nan[1, 1, 1] = float("nan")
    assert int(hidden_digest(nan)) == int(hidden_digest(nan.clone()))  # the same bits, NaN or not


def test_traces_as_one_operator(device):
    """Under torch.compile the kernel is the opaque operator focal_kernels::bits_digest (tracing into the
    launcher failed in the interpreter): one graph, the eager digest."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    x = torch.randn(2, 5, 7, device=device).transpose(1, 2)
    assert int(torch.compile(hidden_digest, fullgraph=True, backend=counter)(x)) == int(hidden_digest(x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_int64_digests_run_eagerly_under_compile(device, path, backend):
    """The digests' int64 arithmetic wraps modulo 2^64; inductor does not keep that (its constant folding
    raised OverflowError for the hidden states' PyTorch twin, and its C++ gave the weighted sum of labels
    other values than eager mode), so the PyTorch digests run eagerly inside a compiled region."""
    x = torch.randn(2, 5, 7, device=device)
    labels = torch.randint(0, 1000, (37,), device=device)

    def digests(hidden, values):
        return hidden_digest(hidden) + 0, weighted_sum(values) + 0  # computed in the graph around them

    torch._dynamo.reset()
    for dynamic in (False, True):
        compiled = torch.compile(digests, backend=backend, dynamic=dynamic)
        assert [int(v) for v in compiled(x, labels)] == [int(v) for v in digests(x, labels)]
