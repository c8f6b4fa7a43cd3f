"""Benchmark shapes: vocabulary, total tokens, dtype and ignored fraction, and the floor's bytes.

Total tokens count chosen and rejected together: 16K = 4 pairs × 2 sequences × 2048 tokens. The
ignored fraction marks the prompt: the first round(fraction · seq_len) labels of every sequence are
ignore_index, so those rows' logits need never be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

FULL_VOCABS = (32000, 128256, 151936, 256000)
FULL_TOKENS = (4096, 16384, 65536)
FULL_DTYPES = ("bf16", "fp32")
FULL_IGNORED = (0.0, 0.4)
GPU_SEQ_LEN = 2048

# With no GPU the kernels run through Triton's interpreter: tiny shapes only.
TINY_VOCABS = (256, 1000)
TINY_TOKENS = (20, 40)
TINY_SEQ_LEN = 5  # 40% ignored is exactly 2 tokens


class PairedTokens:
    """Token counts of `pairs` chosen and `pairs` rejected sequences of `seq_len` tokens, the first
    round(ignored_fraction · seq_len) of each ignored (the prompt). For dataclasses with those fields."""

    pairs: int
    seq_len: int
    ignored_fraction: float

    @property
    def tokens(self) -> int:
        """N: rows (of logits, or of hidden states), chosen and rejected together."""
        return 2 * self.pairs * self.seq_len

    @property
    def ignored_per_sequence(self) -> int:
        return int(round(self.ignored_fraction * self.seq_len))

    @property
    def valid_tokens(self) -> int:
        return 2 * self.pairs * (self.seq_len - self.ignored_per_sequence)

    def row_fields(self) -> dict:
        """A result row's shape fields (what the target tables group and select rows by); the dataclass has
        vocab and dtype_name too."""
        return {"vocab": self.vocab, "pairs": self.pairs, "seq_len": self.seq_len, "tokens": self.tokens,
                "valid_tokens": self.valid_tokens, "ignored_fraction": self.ignored_fraction,
                "dtype": self.dtype_name}


@dataclass(frozen=True)
class Shape(PairedTokens):
    vocab: int
    pairs: int
    seq_len: int
    dtype_name: str
    ignored_fraction: float

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        """Chosen plus rejected logits (also the size of their gradient)."""
        return self.tokens * self.vocab * self.element_size

    @property
    def compile_key(self):
        """What torch.compile specializes on (labels' values do not matter)."""
        return (self.vocab, self.pairs, self.seq_len, self.dtype_name)

    def floor_bytes(self) -> dict:
        """Least HBM traffic per phase: valid rows' logits read once; the whole gradient written once."""
        valid_read = self.valid_tokens * self.vocab * self.element_size
        grad_write = self.logits_bytes
        return {"fwd": valid_read, "bwd": valid_read + grad_write, "fwdbwd": 2 * valid_read + grad_write}

    def label(self) -> str:
        return (f"V={self.vocab} tokens={self.tokens} ({self.pairs}x2x{self.seq_len}) {self.dtype_name} "
                f"ignored={self.ignored_fraction:.0%}")


def make_shape(vocab: int, tokens: int, dtype_name: str, ignored_fraction: float, seq_len: int) -> Shape:
    """Lay `tokens` out as pairs × 2 × seq_len, with seq_len at most the given one."""
    seq_len = max(1, min(seq_len, tokens // 2))
    pairs = max(1, tokens // (2 * seq_len))
    return Shape(vocab, pairs, seq_len, dtype_name, ignored_fraction)


def grid(vocabs, tokens, dtypes, ignored, seq_len):
    return [make_shape(v, t, d, f, seq_len) for d in dtypes for t in tokens for v in vocabs for f in ignored]


def quick_shapes(tiny: bool):
    """--quick: V=128256 at 16K tokens bf16 with 0% and 40% ignored, V=32000 16K bf16, and on a GPU
    V=128256 16K fp32 (tiny shapes on CPU)."""
    if tiny:
        big, small, tokens, seq_len = 1000, 256, 20, TINY_SEQ_LEN
    else:
        big, small, tokens, seq_len = 128256, 32000, 16384, GPU_SEQ_LEN
    shapes = [make_shape(big, tokens, "bf16", 0.0, seq_len), make_shape(big, tokens, "bf16", 0.4, seq_len),
              make_shape(small, tokens, "bf16", 0.0, seq_len)]
    if not tiny:
        shapes.append(make_shape(big, tokens, "fp32", 0.0, seq_len))
    return shapes


def parse_count(text: str) -> int:
    """'16K' → 16384, '4k' → 4096, '2048' → 2048."""
    text = text.strip()
    if text[-1:] in ("k", "K"):
        return int(text[:-1]) * 1024
    return int(text)


def parse_list(text: str, convert):
    return [convert(item) for item in text.split(",") if item.strip()]


def parse_names(text: str, known, what: str) -> list:
    """'a, b' → ['a', 'b'], every name one of `known`; SystemExit naming `what` otherwise."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    return names


def parse_dtype(text: str) -> str:
    name = text.strip().lower()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; use one of bf16, fp32, fp16")
    return DTYPE_NAMES[DTYPES[name]]


def parse_vocab_tokens(text: str):
    """'128256x16K' → (128256, 16384)."""
    vocab, sep, tokens = text.strip().lower().partition("x")
    if not sep:
        raise ValueError(f"a shape is VOCABxTOKENS, e.g. 128256x16K; got {text!r}")
    return int(vocab), parse_count(tokens)
