"""16-byte vector access to rows that do not start on a 16-byte boundary (`@triton.jit` helpers, inlined
where they are called, and the host-side tests that decide when a launch needs them).

The compiler issues 16-byte loads and stores only where it can prove an address a multiple of 16 bytes. Row
(b, t) of a (B, T, V) tensor starts at element b·stride_b + t·stride_t of its base; when a stride is not a
multiple of ALIGN = 16 / element size (V = 50257, GPT-2's vocabulary, for one) the rows start off the
boundaries and every access becomes a single-element one: for bfloat16, 8× the memory instructions (the
forward's PTX at V = 50257: 65 two-byte loads per block where V = 32000 has 8 vector loads; see
benchmarks/NOTES.md).

Peeling restores them: a row's columns split into an unaligned head [0, head), a body [head, body_end) that
starts and ends on boundaries, and an unaligned end [body_end, V), head and end shorter than ALIGN. The body is
read and written in blocks whose offsets `tl.multiple_of` declares aligned (the last one masked by a length
that is a multiple of ALIGN, so the mask too is constant over each vector); head and end take one ALIGN-wide
masked access each. The kernels peel only when a launch needs it (PEEL, from `needs_peel` on the host):
without it the body is the whole row, and aligned rows compile as they would without any of this.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def aligned_body(row_offset, row_end, ALIGN: tl.constexpr, PEEL: tl.constexpr):
    """(head, body_end) of a row of row_end columns starting at element row_offset (int64) of a 16-byte
    aligned base; (0, row_end) without PEEL."""
    head = 0
    body_end = row_end
    if PEEL:
        head = tl.minimum((ALIGN - row_offset % ALIGN) % ALIGN, row_end)
        body_end = head + (row_end - head) // ALIGN * ALIGN
    return head, body_end


@triton.jit
def block_offset(row_offset, column, ALIGN: tl.constexpr, ALIGNED: tl.constexpr):
    """row_offset + column, declared a multiple of ALIGN when ALIGNED (the caller's guarantee). The sum is
    formed here: `tl.multiple_of` marks the operation that makes its value, and an argument has none here."""
    offset = row_offset + column
    if ALIGNED:
        offset = tl.multiple_of(offset, ALIGN)
    return offset


def alignment(element_size: int) -> int:
    """ALIGN: elements per 16 bytes."""
    return max(16 // element_size, 1)


def needs_peel(grids: list[torch.Tensor], block: int) -> bool:
    """Whether some row of these (B, T, V) tensors starts off a 16-byte boundary of a 16-byte aligned base
    (a base off a boundary is left alone: no column offset aligns its rows for the compiler). Blocks of
    `block` columns must keep the body's boundaries: block a multiple of ALIGN (narrower blocks come only with
    V < ALIGN, whose body is empty)."""
    align = alignment(grids[0].element_size())
    if align == 1 or block % align or any(grid.data_ptr() % 16 for grid in grids):
        return False
    return any(grid.stride(dim) % align for grid in grids for dim in (0, 1) if grid.shape[dim] > 1)


def same_row_alignment(grids: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
    """Whether each row of others[i] starts at the same offset modulo 16 bytes as that row of grids[i] (then a
    column that is aligned in one is aligned in the other)."""
    align = alignment(grids[0].element_size())
    return all(grid.element_size() == other.element_size() and (grid.data_ptr() - other.data_ptr()) % 16 == 0
               and all((grid.stride(dim) - other.stride(dim)) % align == 0 for dim in (0, 1) if grid.shape[dim] > 1)
               for grid, other in zip(grids, others))
