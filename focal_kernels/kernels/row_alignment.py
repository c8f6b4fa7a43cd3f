"""16-byte vector access to rows that do not start on a 16-byte boundary (`@triton.jit` helpers, inlined
where they are called, and the host-side tests that decide when a launch needs them).

The compiler issues 16-byte loads and stores only where it can prove an address a multiple of 16 bytes, and
of an integer argument it knows only whether it is divisible by 16. Row (b, t) of a (B, T, V) tensor starts
at element b·stride_b + t·stride_t of its base; when a stride is not a multiple of 16 (V = 50257, GPT-2's
vocabulary, for one; or V = 32008, whose bfloat16 rows are aligned without the compiler knowing) every access
becomes a single-element one: for bfloat16, 8× the memory instructions (the forward's PTX at V = 50257: 65
two-byte loads per block where V = 32000 has 8 vector loads; see benchmarks/NOTES.md).

Peeling restores them: a row's columns split into an unaligned head [0, head), a body [head, body_end) that
starts and ends on boundaries (ALIGN = 16 / element size elements), and an unaligned end [body_end, V), head
and end shorter than ALIGN. The body is read and written in blocks whose offsets `tl.multiple_of` declares
aligned (the last one masked by a length that is a multiple of ALIGN, so the mask too is constant over each
vector); head and end take one ALIGN-wide masked access each. Every declared offset is a true multiple,
masked-off accesses included. The kernels peel only when a launch needs it (PEEL, from `needs_peel` on the
host): without it the body is the whole row, and rows the compiler sees aligned compile as before.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def aligned_body(row_offset, row_end, ALIGN: tl.constexpr, PEEL: tl.constexpr):
    """(head, body_end) of a row of row_end columns starting at element row_offset (int64) of a 16-byte
    aligned base: row_offset + head and row_offset + body_end are multiples of ALIGN, head < ALIGN, and the
    body [head, body_end) is empty when row_end <= head (so that even fully masked accesses are declared
    aligned truthfully); (0, row_end) without PEEL. The head's columns are [0, min(head, row_end))."""
    head = 0
    body_end = row_end
    if PEEL:
        head = (ALIGN - row_offset % ALIGN) % ALIGN
        body_end = head + tl.maximum(row_end - head, 0) // ALIGN * ALIGN
    return head, body_end


@triton.jit
def aligned_sum(a, b, ALIGN: tl.constexpr, ALIGNED: tl.constexpr):
    """a + b, declared a multiple of ALIGN when ALIGNED (the caller's guarantee): a block's offset, or the
    length of a masked block. The sum is formed here: `tl.multiple_of` marks the operation that makes its
    value, and an argument has none here."""
    total = a + b
    if ALIGNED:
        total = tl.multiple_of(total, ALIGN)
    return total


def alignment(element_size: int) -> int:
    """ALIGN: elements per 16 bytes."""
    return max(16 // element_size, 1)


def needs_peel(grids: list[torch.Tensor], block: int) -> bool:
    """Whether the compiler cannot see that the rows of these (B, T, V) tensors start on 16-byte boundaries:
    it knows an integer argument's divisibility by 16 only, so some stride not a multiple of 16 (size-1 dims
    included: it does not know their index is 0). Never for a base off a boundary (no column offset aligns
    its rows), nor for blocks narrower than 16 bytes (they come only with V < ALIGN: no body to read)."""
    align = alignment(grids[0].element_size())
    if align == 1 or block % align or any(grid.data_ptr() % 16 for grid in grids):
        return False
    return any(grid.stride(dim) % 16 for grid in grids for dim in (0, 1))


def same_row_alignment(grids: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
    """Whether each row of others[i] starts at the same offset modulo 16 bytes as that row of grids[i] (then a
    column that is aligned in one is aligned in the other)."""
    align = alignment(grids[0].element_size())
    return all(grid.element_size() == other.element_size() and (grid.data_ptr() - other.data_ptr()) % 16 == 0
               and all((grid.stride(dim) - other.stride(dim)) % align == 0 for dim in (0, 1) if grid.shape[dim] > 1)
               for grid, other in zip(grids, others))
