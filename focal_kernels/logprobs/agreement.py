"""Agreement between ranks, before they communicate: what lets the vocabulary- and sequence-parallel calls
(logprobs/parallel.py) raise the same clear error on every rank instead of hanging in a collective or
mixing different inputs into wrong log-probs.

Before it communicates, a parallel call makes one agreement round per group (and per tensor it sums over a
sequence-parallel group): each rank runs its own argument checks, then all_gathers a small int64 vector
(whether its checks passed; its shapes, dtypes, options as float64 bits, digests of its labels, cu_seqlens
and hidden states), and one host read lets every rank compare every rank's vector. A rank whose checks
failed raises its own error; the others raise `RankFailed`, naming it. Digests are sums of values times odd
pseudo-random weights modulo 2^64 (the labels and cu_seqlens with `position_weights`, the hidden states' bits
with kernels/bits_digest.py's row × column weights), computed on the device and read with the rest of the
vector: one synchronization per round. Nothing here is vocabulary-sized.
"""

from __future__ import annotations

import struct
from functools import wraps
from typing import NamedTuple

import torch

from .. import backend
from ..checks import CU_SEQLENS_RULES, cu_seqlens_problems, data_checks_enabled
from . import ops

__all__ = ["RankFailed"]


# ------------------------------------------------------------------ groups, and one agreement round

def torch_distributed():
    """torch.distributed, imported where a parallel call first needs it."""
    import torch.distributed as dist

    return dist


def check_group(group, what="group", *, ordered=True):
    """The ProcessGroup to use: `group` itself, or a one-dimensional DeviceMesh's group (whose ranks must
    ascend, `mesh_group`, when `ordered`: vocabulary slices follow the rank order, a sum does not). Raises a
    clear error when torch.distributed is unavailable or not initialized, or when this process is not in the group
    (before any collective: nothing can hang here)."""
    if not torch.distributed.is_available():
        raise RuntimeError(f"{what} was given, but torch.distributed is not available in this PyTorch build")
    dist = torch_distributed()
    if not dist.is_initialized():
        raise RuntimeError(f"{what} was given, but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group(...) on every rank first")
    if group is None:
        raise TypeError(f"{what} must be a torch.distributed ProcessGroup (dist.group.WORLD for all ranks) or a "
                        "one-dimensional DeviceMesh, got None")
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"{what}: a DeviceMesh must be one-dimensional (pass mesh['name'] or "
                             f"mesh.get_group(dim)), got a {group.ndim}-dimensional mesh")
        group = mesh_group(group, 0, what) if ordered else group.get_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {what}")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{what} must be a torch.distributed ProcessGroup or a one-dimensional DeviceMesh, got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {what}")
    return group


def mesh_group(mesh, mesh_dim, what):
    """The process group of `mesh`'s dimension `mesh_dim`, after checking that its ranks are in ascending order
    along it. Vocabulary slices follow the process group's rank order, which is ascending, while DTensor lays
    its shards out in mesh order: on a mesh such as DeviceMesh("cpu", [1, 0]) the two disagree (and PyTorch's
    own full_tensor() is wrong there). Every rank of that group sees the same ranks, so all raise alike."""
    ranks = mesh.mesh.movedim(mesh_dim, -1).reshape(-1, mesh.mesh.shape[mesh_dim])
    mine = ranks[(ranks == torch_distributed().get_rank()).any(dim=1)].tolist()
    if mine and mine[0] != sorted(mine[0]):
        raise ValueError(f"{what}: the DeviceMesh's ranks along the vocabulary dimension are {mine[0]}, not in "
                         "ascending order; vocabulary slices follow the process group's (ascending) rank order, so "
                         "build the mesh with ascending ranks")
    return mesh.get_group(mesh_dim)


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        return None
    return DeviceMesh


def _info_device(group, tensor):
    """Where the small agreement tensors travel: the CPU for gloo, the inputs' device otherwise (NCCL). The
    first step of every agreement (`_agree` follows): under torch.compile, the graph break comes here, before
    any torch.distributed call (torch 2.10's dynamo cannot trace get_backend)."""
    _leave_graph()
    if torch_distributed().get_backend(group) == "gloo":
        return torch.device("cpu")
    if isinstance(tensor, torch.Tensor):
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_GRAPH_BREAK = ("focal_kernels' vocabulary- and sequence-parallel calls read the ranks' gathered checks on the "
                "host (a graph break): use torch.compile without fullgraph=True, or call them outside the compiled "
                "region")
# graph_break(msg=) is there from torch 2.11 on at least (2.11, 2.13, 2.14 tested); older versions' graph_break
# takes no argument (the break would happen, then the eager call raise TypeError), so they get none (2.10).
_GRAPH_BREAK_TAKES_MSG = torch.torch_version.TorchVersion(torch.__version__) >= "2.11"


def _leave_graph():
    """Under torch.compile, an explicit graph break, so that the agreement runs eagerly and fullgraph=True
    fails with that reason (not a data-dependent guard error). (torch.compiler.disable as a decorator would
    import torch._dynamo, and with it triton, when focal_kernels is imported: see backend.py.)"""
    if torch.compiler.is_compiling():
        from torch import _dynamo  # already imported while compiling

        if _GRAPH_BREAK_TAKES_MSG:
            _dynamo.graph_break(msg=_GRAPH_BREAK)
        else:  # torch < 2.11: a break without a reason
            _dynamo.graph_break()


def _agree(group, device, local_error, fields, what):
    """One all_gather of every rank's int64 `fields` (a 1-D device tensor, or None when local_error) and one
    host read. Every rank learns every rank's fields; when any rank's own checks failed (local_error), every
    rank raises: the failing rank its own error, the others a ValueError naming it (messages exchanged with
    all_gather_object, on this path only). Returns the fields as a list of lists, in group rank order.
    Under torch.compile the graph breaks here too, not only in `_info_device`: dynamo traces the frames that
    run after a break anew, and this one makes the collectives."""
    _leave_graph()
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what}: the vocabulary- and sequence-parallel calls cannot be captured in a CUDA "
                           "graph (every call reads the ranks' gathered checks on the host); call them outside "
                           "the captured region")
    dist = torch_distributed()
    size = dist.get_world_size(group)
    width = _INFO_WIDTH
    if fields is None:
        fields = torch.zeros(width, dtype=torch.int64)
    ok = torch.ones(1, dtype=torch.int64, device=fields.device) * (local_error is None)
    pad = torch.zeros(width - fields.numel(), dtype=torch.int64, device=fields.device)
    mine = torch.cat([ok, fields, pad]).to(device)  # one copy to the collective's device
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).tolist()
    if all(row[0] for row in rows):
        return [row[1:] for row in rows]
    messages = [None] * size
    if local_error is None:
        mine = None
    elif isinstance(local_error, RankFailed):  # heard from another rank: passed on as it is
        mine = (True, str(local_error))
    else:
        mine = (False, f"{type(local_error).__name__}: {local_error}")
    dist.all_gather_object(messages, mine, group=group)
    if local_error is not None:
        raise local_error
    rank, (relayed, message) = next((rank, m) for rank, m in enumerate(messages) if m is not None)
    if relayed:
        raise RankFailed(message)
    raise RankFailed(f"{what}: the inputs of rank {rank} of the group{_global(group, rank)} failed its checks "
                     f"({message}); every rank stops")


class RankFailed(ValueError):
    """Raised on every rank whose own inputs were fine when another rank's checks failed (the message names
    that rank and quotes its error)."""


def _global(group, rank):
    """' (global rank g)' where a group rank differs from its global rank (a subgroup of a mesh), else ''."""
    try:
        number = torch_distributed().get_global_rank(group, rank)
    except (RuntimeError, ValueError, AttributeError):  # pragma: no cover (older PyTorch, default group)
        number = rank
    return "" if number == rank else f" (global rank {number})"


def _ranks(group, first, other):
    """'ranks 0 and 2' (with their global ranks where they differ), for the mismatch messages."""
    return f"ranks {first}{_global(group, first)} and {other}{_global(group, other)}"


def agree_over_mesh(mesh, error, what):
    """Every rank of the device mesh learns whether any rank's call failed (error: this rank's exception, or
    None), one mesh dimension after another (an error spreads along each in turn: over the whole mesh).
    Returns the exception this rank must raise (its own, or a ValueError naming a failed rank), or None."""
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        try:
            _agree(group, _info_device(group, None), error, None, what)
        except Exception as exc:  # noqa: BLE001 (re-raised by the caller, after every dimension has agreed)
            error = error if error is not None else exc
    return error


# ------------------------------------------------------------------ the agreement vector's values, and digests

_INFO_WIDTH = 25  # int64 fields per rank (unused ones 0)


def _ints_of(values, device):
    """A 1-D int64 tensor on `device` from Python ints and 0-dim device tensors: one host-to-device copy and
    one scatter, no host read."""
    out = torch.tensor([0 if isinstance(v, torch.Tensor) else int(v) for v in values], dtype=torch.int64)
    out = out.to(device)
    positions = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if positions:
        out[positions] = torch.stack([values[i].reshape(()).to(device=device, dtype=torch.int64) for i in positions])
    return out


def float_bits(value):
    """A float's IEEE-754 float64 bits as an int64, so that options compare exactly in the agreement vector.
    None (only ever an absent soft-cap, which must be > 0 when given) is encoded as -1.0."""
    return struct.unpack("<q", struct.pack("<d", -1.0 if value is None else float(value)))[0]


def _odd_mix(z):
    """An odd pseudo-random int64 per int64 position: splitmix64's finalizer (arithmetic shifts; int64
    arithmetic wraps alike on every device) with the low bit set, as kernels/bits_digest.py's `_mix`."""
    z = z * -7046029254386353131  # 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return (z ^ (z >> 31)) | 1


def _eager(fn):
    """fn, run eagerly also where torch.compile traces its caller (only the distributed calls use it, and they
    break the graph anyway): the digests' int64 arithmetic wraps modulo 2^64 in eager mode on every device,
    which inductor does not keep (it folds constants in Python integers, an OverflowError, and its C++ leaves
    signed overflow undefined: other digests than eager mode's)."""
    @wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn, recursive=True)(*args)
        return fn(*args)
    return call


def position_weights(count, device):
    """count pseudo-random odd int64 weights, a fixed function of the position. For x of 32-bit integers
    (labels, offsets, float64 values as `float_words`), Σ x·w modulo 2^64 always changes when one x does (an
    odd weight times a nonzero difference below 2^33), and otherwise only by an accident of probability about
    2^-32 or less (where Σ x·position misses e.g. +1, −2, +1 at three consecutive positions)."""
    return _odd_mix(torch.arange(1, count + 1, device=device, dtype=torch.int64))


@_eager
def weighted_sum(values):
    """Σ values·w modulo 2^64 over a 1-D int64 tensor (w: `position_weights`): a 0-dim int64 device tensor."""
    return (values * position_weights(values.numel(), values.device)).sum()


def float_words(values):
    """values' bits as integers of at most 32 bits (the last dimension doubled for 64-bit dtypes, through a
    contiguous copy), the unit the digests weight: a float64 sign flip changes its high word by 2^31 where it
    would change the int64 by 2^63, which any even number of flips times odd weights cancels modulo 2^64."""
    if values.element_size() > 4:
        return values.detach().contiguous().view(torch.int32)
    return values.detach().view({1: torch.int8, 2: torch.int16, 4: torch.int32}[values.element_size()])


def hidden_digest(hidden):
    """A 0-dim int64 device tensor that depends on hidden's (B, T, H) exact bits only (kernels/bits_digest.py;
    its PyTorch twin, with a (B·T, C) int64 temporary, C = H (2H for float64: two int32 words a value), where
    the kernels do not run): one read of the hidden states, no host read."""
    bits = float_words(hidden)
    if backend.use_triton(hidden):
        return ops.bits_digest(bits)
    return _bits_digest_torch(bits)


@_eager
def _bits_digest_torch(bits):
    """hidden_digest's PyTorch twin of kernels/bits_digest.py."""
    flat = bits.reshape(-1, bits.shape[-1]).to(torch.int64)
    rows = torch.arange(flat.shape[0], dtype=torch.int64, device=flat.device)
    cols = torch.arange(flat.shape[1], dtype=torch.int64, device=flat.device)
    return ((flat * _odd_mix(2 * cols + 2)).sum(dim=1) * _odd_mix(2 * rows + 1)).sum()


def _labels_digest(labels, ignore_index, cu_seqlens, tokens):
    """Device-side int64 [min, max (ignored labels as 0), Σ labels, Σ labels·w, cu_seqlens rules ×3,
    Σ cu_seqlens·w] (w: `position_weights`): enough to check the range and that every rank holds the same
    labels, read with the rest of the agreement in one synchronization."""
    flat = labels.reshape(-1).to(torch.int64)
    if flat.numel():
        smallest, largest = torch.aminmax(torch.where(flat == ignore_index, 0, flat))
        digest = [smallest, largest, flat.sum(), weighted_sum(flat)]
    else:
        digest = [0, 0, 0, 0]
    if cu_seqlens is None:
        digest += [1, 1, 1, 0]
    else:
        cu = cu_seqlens.to(torch.int64)
        digest += list(cu_seqlens_problems(cu, tokens).long().unbind())
        digest.append(weighted_sum(cu))
    return digest


# ------------------------------------------------------------------ the vocabulary-parallel agreement

# The vocabulary-parallel agreement vector, written once: (field, width) in order.
_LAYOUT_FIELDS = (
    ("vocab", 1), ("batch", 1), ("time", 1), ("seqs", 1), ("hidden", 1), ("dtype", 1), ("grad", 1), ("checked", 1),
    ("ignore", 1), ("bias", 1), ("counts", 1),  # counts: return_token_counts (per-sequence calls)
    ("options", 3),      # logit_softcap, logit_scale, temperature as float64 bits (logits: 1.0's)
    ("digest", 8),       # `_labels_digest`: min, max, Σ, Σ·w, 3 cu_seqlens flags, cu digest
    ("caller", 2),       # the caller's own digest (`agree_on`: the loss's arguments), compared as given
    ("hidden_bits", 1),  # the hidden states' `hidden_digest` (the hidden-state path; else 0)
)


def _layout_vector(values, device):
    """The agreement vector from {field: int, 0-dim tensor, or a sequence of `width` of them}, in
    _LAYOUT_FIELDS' order."""
    flat = []
    for name, width in _LAYOUT_FIELDS:
        value = values.pop(name)
        flat.extend([value] if width == 1 else value)
        assert width == 1 or len(value) == width, name
    assert not values, values
    return _ints_of(flat, device)


def _layout_row(row):
    """A gathered agreement row as {field: int, or a list of `width` ints}."""
    named, start = {}, 0
    for name, width in _LAYOUT_FIELDS:
        named[name] = row[start] if width == 1 else row[start:start + width]
        start += width
    return named


assert sum(width for _, width in _LAYOUT_FIELDS) <= _INFO_WIDTH


_OPTION_NAMES = ("logit_softcap", "logit_scale", "temperature")


DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4, torch.int64: 5,
               torch.int32: 6}


def dtype_code(dtype):
    return DTYPE_CODES.get(dtype, 0)


def _check_agreement(rows, what, group, *, hidden_path, names, caller=None):
    """The ValueErrors every rank raises alike (they all read the same gathered rows)."""
    values_name, labels_name = names
    first = rows[0]
    for rank, row in enumerate(rows):
        if any(row[name] != first[name] for name in ("batch", "time", "seqs")):
            def shape(r):
                seqs = f", {r['seqs']} packed sequences" if r["seqs"] >= 0 else ""
                return f"(B, T) = ({r['batch']}, {r['time']}){seqs}"
            raise ValueError(f"{what}: every rank of the vocabulary-parallel group must score the same tokens, "
                             f"but rank 0{_global(group, 0)} has {shape(first)} and rank {rank}{_global(group, rank)} "
                             f"has {shape(row)}")
        if row["dtype"] != first["dtype"]:
            kind = "hidden states" if hidden_path else "logits"
            raise ValueError(f"{what}: every rank's {kind} must have the same dtype, but {_ranks(group, 0, rank)} "
                             "differ")
        if hidden_path and row["hidden"] != first["hidden"]:
            raise ValueError(f"{what}: every rank's hidden size must match, got H = {first['hidden']} on rank 0 "
                             f"and {row['hidden']} on rank {rank}{_global(group, rank)}")
        if hidden_path and row["grad"] != first["grad"]:
            raise ValueError(f"{what}: hidden must require a gradient, with gradients enabled (not under "
                             "torch.no_grad()), on every rank or on none (the backward all-reduces its gradient), "
                             f"but {_ranks(group, 0, rank)} differ")
        if hidden_path and row["bias"] != first["bias"]:
            raise ValueError(f"{what}: a bias must be given on every rank or on none, but "
                             f"{_ranks(group, 0, rank)} differ")
        if hidden_path and row["hidden_bits"] != first["hidden_bits"]:
            raise ValueError(f"{what}: {values_name} must be the same on every rank of the vocabulary-parallel group "
                             f"(the lm_head's replicated input), but {_ranks(group, 0, rank)} differ")
        if row["ignore"] != first["ignore"]:
            raise ValueError(f"{what}: ignore_index must be the same on every rank, got {first['ignore']} on rank 0 "
                             f"and {row['ignore']} on rank {rank}{_global(group, rank)}")
        for k, name in enumerate(_OPTION_NAMES):
            if row["options"][k] != first["options"][k]:
                raise ValueError(f"{what}: {name} must be the same on every rank, but {_ranks(group, 0, rank)} differ")
        # compared whatever validate_labels says: cheap device sums, read with the rest of the agreement
        if row["digest"][2:4] != first["digest"][2:4]:
            raise ValueError(f"{what}: {labels_name} must be the same on every rank of the vocabulary-parallel group "
                             "(global vocabulary ids), but they differ")
        if row["digest"][7] != first["digest"][7]:
            raise ValueError(f"{what}: cu_seqlens must be the same on every rank of the vocabulary-parallel group")
        if row["caller"] != first["caller"]:
            raise ValueError(f"{what}: {caller or _CALLER_ARGUMENTS} must be the same on every rank of the "
                             f"vocabulary-parallel group, but {_ranks(group, 0, rank)} differ")
        if row["counts"] != first["counts"]:  # after the loss's arguments, whose loss type may need counts
            raise ValueError(f"{what}: return_token_counts must be the same on every rank of the "
                             f"vocabulary-parallel group, but {_ranks(group, 0, rank)} differ")


_CALLER_ARGUMENTS = ("the loss's arguments (loss_type, loss_weights, beta, gamma, reduction and the other loss "
                     "options, ref_chosen_logps, ref_rejected_logps, pair_weights)")


class VocabLayout(NamedTuple):
    """A vocabulary-parallel group's agreed layout: this rank's first vocabulary id, the whole vocabulary's
    size, and a digest of every rank's slice size in group rank order (the same on every rank of the group)."""
    start: int
    total: int
    digest: int


def _vocab_layout(rows, group):
    """The VocabLayout from the gathered local sizes, in group rank order."""
    sizes = tuple(row["vocab"] for row in rows)
    rank = torch_distributed().get_rank(group)
    return VocabLayout(sum(sizes[:rank]), sum(sizes), hash(sizes))  # an int tuple's hash: the same in every process


def _check_label_values(rows, vocab_total, ignore_index, tokens, cu_seqlens, labels_name="labels"):
    checked = [row for row in rows if row["checked"]]
    if not checked:
        return
    digest = checked[0]["digest"]
    smallest, largest = min(r["digest"][0] for r in checked), max(r["digest"][1] for r in checked)
    if smallest < 0 or largest >= vocab_total:
        bad = smallest if smallest < 0 else largest
        raise ValueError(f"{labels_name} must be in [0, {vocab_total}) (the vocabulary summed over the "
                         f"vocabulary-parallel group) or equal ignore_index={ignore_index}; found {bad}")
    for index, ok in enumerate(digest[4:7]):
        if not ok:
            raise ValueError(f"{CU_SEQLENS_RULES[index]} (N = {tokens}); got {cu_seqlens.tolist()}")


def gather_layout(group, what, tensor, local_error, *, vocab, batch, seq_len, cu_seqlens, hidden, dtype,
                   needs_grad, labels, ignore_index, validate_labels, has_bias=False, options=(1.0, 1.0, 1.0),
                   agree_on=(0, 0), names=("logits", "labels"), hidden_values=None, agree_on_name=None,
                   token_counts=False):
    """The one agreement round of a vocabulary-parallel call: returns its VocabLayout. Shapes, dtypes,
    ignore_index, the logit options, whether there is a bias, whether token counts are returned
    (`token_counts`), the labels (as sums) and the caller's two `agree_on` ints must agree on every rank, and
    on the hidden-state path (hidden >= 0: the size H) `hidden_values`' exact bits too; validate_labels=True
    also checks the label range and cu_seqlens rules. names: the (logits or hidden states, labels) arguments'
    names for the messages; agree_on_name: what `agree_on` digests, for the message (default: the fused
    losses' arguments)."""
    device = _info_device(group, tensor)
    fields = None
    if local_error is None:
        checked = data_checks_enabled(validate_labels, tensor)
        digest = _labels_digest(labels, ignore_index, cu_seqlens, seq_len)
        fields = _layout_vector(dict(
            vocab=vocab, batch=batch, time=seq_len, seqs=-1 if cu_seqlens is None else cu_seqlens.shape[0] - 1,
            hidden=hidden, dtype=dtype_code(dtype), grad=int(needs_grad), checked=int(checked),
            ignore=int(ignore_index), bias=int(has_bias), counts=int(bool(token_counts)),
            options=[float_bits(v) for v in options], digest=digest,
            caller=agree_on, hidden_bits=hidden_digest(hidden_values) if hidden >= 0 else 0), tensor.device)
    rows = [_layout_row(row) for row in _agree(group, device, local_error, fields, what)]
    _check_agreement(rows, what, group, hidden_path=hidden >= 0, names=names, caller=agree_on_name)
    if any(row["vocab"] < 1 for row in rows):
        raise ValueError(f"{what}: every rank must hold at least one vocabulary entry; local sizes "
                         f"{[row['vocab'] for row in rows]}")
    layout = _vocab_layout(rows, group)
    _check_label_values(rows, layout.total, ignore_index, seq_len, cu_seqlens, names[1])
    return layout


# ------------------------------------------------------------------ the sequence-parallel agreement

# The sequence-parallel agreement's fields: ndim, dtype, return_token_counts, agree_on ×2, the log-prob call's
# options (up to 9 ints, unused ones 0), then the shape.
_SP_SHAPE = 14
SP_MAX_DIMS = _INFO_WIDTH - _SP_SHAPE


def agree_sum_layout(per_sequence_values, group, error, what, tags=()):
    """The agreement round of a sum over the sequence-parallel group, before its all-reduce: every rank raises
    when `error` is set on any rank; the values' shapes and dtypes and the `tags` must agree (at most 12 ints:
    whether token counts follow, the caller's `agree_on` digest, and the log-prob call's options; missing
    ones 0)."""
    assert len(tags) <= _SP_SHAPE - 2, tags
    tensor = per_sequence_values if error is None else None
    device = _info_device(group, tensor)
    fields = None
    if error is None:
        shape = list(per_sequence_values.shape)
        tags = (*tags, *(0,) * (_SP_SHAPE - 2 - len(tags)))
        fields = _ints_of([per_sequence_values.dim(), dtype_code(per_sequence_values.dtype), *tags,
                           *shape], device)
    rows = _agree(group, device, error, fields, what)
    for rank, row in enumerate(rows):
        if row[:2] + row[_SP_SHAPE:] != rows[0][:2] + rows[0][_SP_SHAPE:]:
            def describe(r):
                dtype = {code: dt for dt, code in DTYPE_CODES.items()}.get(r[1], "another dtype")
                return f"shape {tuple(r[_SP_SHAPE:_SP_SHAPE + r[0]])} {dtype}"
            raise ValueError(f"{what}: every rank of the sequence-parallel group must pass the same number of "
                             f"sequences (same shape and dtype), but rank 0 has {describe(rows[0])} and "
                             f"rank {rank}{_global(group, rank)} "
                             f"has {describe(row)}")
        if row[2] != rows[0][2]:
            raise ValueError(f"{what}: return_token_counts (or a loss type that needs token counts) must be the "
                             f"same on every rank of the sequence-parallel group, but {_ranks(group, 0, rank)} differ")
        if row[3:5] != rows[0][3:5]:
            raise ValueError(f"{what}: {_CALLER_ARGUMENTS} must be the same on every rank of the sequence-parallel "
                             f"group, but {_ranks(group, 0, rank)} differ")
        if row[5:_SP_SHAPE] != rows[0][5:_SP_SHAPE]:
            raise ValueError(f"{what}: ignore_index, logit_softcap, logit_scale, temperature, whether there is a "
                             "bias, the vocabulary (with a vocabulary-parallel group, its slices' sizes) and hidden "
                             "sizes and the dtypes must be the same on every rank of the sequence-parallel group, "
                             f"but {_ranks(group, 0, rank)} differ")
