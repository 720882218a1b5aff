"""Work several monitors need from the same prototypes at the same moment, done once.

The norms, gradient, delta, evolution and health monitors all read the prototypes, their
gradient and the update of the step. Each pass over a (K, D) tensor is cheap, but a dozen of them
per step is a measurable share of a small model's step. :class:`ProtoStats` (one per
run, ``ctx.proto_stats``) memoises them within one event: the hub calls :meth:`next_event` before
each dispatch, so a value is reused only by monitors of the same event, never across an
``optimizer.step()`` or any other change to the tensors, including ``.data`` writes that
PyTorch's version counter does not see. Within an event the key also holds the tensor's
version counter, so hooks called directly (without a hub) see in-place changes too.

Everything stays on the prototypes' device; nothing here reads a value on the host.

At large K (DINO's 65,536 x 256 is 67 MB in float32) every pass over a (K, D) tensor is a
measurable share of a step, and a fresh (K, D) temporary costs page faults besides. So: the one
persistent (K, D) buffer is the snapshot; differences (the update, the drift) are reduced in row
blocks through a small reused scratch (:func:`row_distances`), which reads each operand once and
writes nothing of size (K, D) (at a K that fits one block the update is instead subtracted in
place of the snapshot, which every reader has used by then); totals are one fused
``vector_norm`` pass. Per-row statistics may
be taken on a fixed row sample above ``SAMPLE_ABOVE`` rows (:func:`row_sample`); the totals
(``||P||``, ``||grad||``, ``||update||``, drift) are always exact.

Even fused, the whole-tensor statistics are several passes over (K, D) a step: the snapshot copy,
the update's difference and norm, ``||P||`` and the gradient's norm before and after clipping, and
no eager PyTorch kernel fuses a difference with its norm. So above ``full_above`` prototypes (16,384) they
are taken on every ``full_every``-th step (10) only (:meth:`ProtoStats.full_step`); on those
steps they are exact, and the per-row statistics of the row sample come every step. At or below
``full_above`` every step is a full step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .cadence import on_multiple


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors do not count versions
        return -1


#: per-row statistics (norms, gradients) use a fixed row sample when K is above this (the
#: monitors' ``sample_above`` option)
SAMPLE_ABOVE = 16384
#: rows of that sample (the monitors' ``sample_rows`` option)
SAMPLE_ROWS = 4096
#: elements of one row block of :func:`row_distances`: 1 MB of float32 stays in a CPU core's L2
#: cache; on a GPU larger blocks only save kernel launches
_BLOCK_CPU = 1 << 18
_BLOCK_GPU = 1 << 22

#: above this many prototypes the whole-tensor statistics are taken every FULL_EVERY steps
FULL_ABOVE = 16384
#: the cadence of the whole-tensor statistics above FULL_ABOVE (1: every step)
FULL_EVERY = 10

#: (N, K) assignments the monitors read per capture: every row up to this many entries, else the
#: first ``assignment_rows(K)`` rows (the per-capture matmul and entropies scale with N x K)
ASSIGN_ENTRIES = 1 << 20

_SAMPLES: dict[tuple, torch.Tensor] = {}
#: id of a row_sample -> (first row, spacing): its rows as a strided view
_STRIDED: dict[int, tuple[int, int]] = {}


def assignment_rows(K: int) -> int:
    """Rows of an (N, K) assignment matrix the monitors read: ``ASSIGN_ENTRIES // K``, at least 16
    (2,048 at K=512: every row of a usual batch; 16 at K=65,536)."""
    return max(16, ASSIGN_ENTRIES // max(1, K))


def row_sample(K: int, sample_above: int, sample_rows: int, device: torch.device,
               seed: int = 0) -> Optional[torch.Tensor]:
    """Sorted indices of a fixed, evenly spaced subset of ``sample_rows`` of K rows (every
    ``K // sample_rows``-th row from ``seed % (K // sample_rows)``), made on ``device``, the same
    at every call; None when ``K <= sample_above`` (use all). Prototype indices carry no meaning
    (the rows are initialised alike and trained alike), so evenly spaced rows estimate the table
    as a random subset does, also when a table was initialised in blocks; and they are a strided
    view of P, read without a gather."""
    if K <= sample_above or sample_rows >= K:
        return None
    key = (K, sample_rows, str(device), seed)
    idx = _SAMPLES.get(key)
    if idx is None:
        step = K // sample_rows
        start = seed % step
        idx = torch.arange(start, start + step * sample_rows, step, device=device)
        _SAMPLES[key] = idx
        _STRIDED[id(idx)] = (start, step)
    return idx


def sampled_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` of ``t``: a strided view for a :func:`row_sample`, else a gather."""
    strided = _STRIDED.get(id(idx))
    if strided is not None and t.shape[0] >= strided[0] + strided[1] * (idx.shape[0] - 1) + 1:
        start, step = strided
        return t[start: start + step * idx.shape[0]: step]
    return t.index_select(0, idx)


def block_rows(shape: torch.Size, device: torch.device) -> int:
    """Rows per block of :func:`row_distances` for a tensor of ``shape`` on ``device``."""
    width = max(1, math.prod(shape[1:]))
    return max(1, (_BLOCK_GPU if device.type == "cuda" else _BLOCK_CPU) // width)


def row_distances(a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) ``||a_k - b_k||`` of two (K, ...) tensors, in the work dtype of ``a``, without a (K, D)
    temporary: row blocks are subtracted into ``scratch`` (reused when it fits, else made) and
    reduced while still in cache. Returns (distances, scratch) so that the caller may keep the
    scratch for the next call. Exact: the same differences and norms as ``vector_norm(a - b)``."""
    K = a.shape[0]
    dt = work_dtype(a.dtype)
    a2, b2 = a.reshape(K, -1), b.reshape(K, -1)
    rows = min(K, block_rows(a.shape, a.device))
    if scratch is None or scratch.dtype != dt or scratch.device != a.device \
            or scratch.shape[1:] != a2.shape[1:] or scratch.shape[0] < rows:
        scratch = torch.empty((rows, a2.shape[1]), device=a.device, dtype=dt)
    same = a.dtype == dt and b.dtype == dt
    if K <= rows and out is None:  # one block (small K): two kernels, no loop
        s = scratch[:K]
        if same:
            torch.sub(a2, b2, out=s)
        else:
            s.copy_(a2)
            s.sub_(b2)
        return torch.linalg.vector_norm(s, dim=1), scratch
    if out is None:
        out = torch.empty(K, device=a.device, dtype=dt)
    for start in range(0, K, rows):
        stop = min(K, start + rows)
        s = scratch[: stop - start]
        if same:
            torch.sub(a2[start:stop], b2[start:stop], out=s)
        else:  # half precision: the difference in the work dtype, as (a.float() - b.float())
            s.copy_(a2[start:stop])
            s.sub_(b2[start:stop])
        torch.linalg.vector_norm(s, dim=1, out=out[start:stop])
    return out, scratch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 prototypes (norms of low-precision tensors in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_of(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t.grad`` without the warning PyTorch prints for a non-leaf tensor (which has none)."""
    if not t.is_leaf and not t.retains_grad:
        return None
    return t.grad


class ProtoStats:
    """Per-event memo of prototype statistics; see the module docstring.

    Methods take the run context and return device tensors, or None when the tensor they need
    does not exist (no gradient, no snapshot this step).
    """

    def __init__(self, full_every: int = FULL_EVERY, full_above: int = FULL_ABOVE) -> None:
        #: whole-tensor statistics every ``full_every`` steps above ``full_above`` prototypes
        self.full_every = full_every
        self.full_above = full_above
        self._event = 0
        self._memo: dict[tuple, Any] = {}
        self._snap: Optional[torch.Tensor] = None      # (K, D) prototypes before step()
        self._snap_key: Optional[tuple] = None         # (step, event) of the snapshot
        self._snap_spent = False                       # the update was subtracted into it in place
        self._scratch: Optional[torch.Tensor] = None   # (rows, D) block of row_distances
        self._update: Optional[tuple] = None           # (step, (K,) update row norms) of the last step

    def full_step(self, ctx: Any) -> bool:
        """Whether this step takes the statistics that need a whole pass over (K, D) (the
        snapshot and update, ``||P||``, the gradient's norm): every step up to ``full_above``
        prototypes, every ``full_every``-th step above (see the module docstring)."""
        return ctx.prototypes.shape[0] <= self.full_above or on_multiple(ctx.step, self.full_every)

    def next_event(self) -> None:
        """Forget the values of the previous event (the hub calls this before each dispatch)."""
        self._event += 1
        if self._memo:
            self._memo.clear()

    def _memoised(self, name: str, ctx: Any, t: torch.Tensor, fn: Callable[[], Any]) -> Any:
        # t: the tensor object the value derives from (ctx.prototypes or its .grad, not a
        # fresh .detach(), whose id changes at every call)
        key = (name, self._event, ctx.step, id(t), t.data_ptr(), _version(t))
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    # -- the prototypes ---------------------------------------------------------------------
    def row_norms(self, ctx: Any) -> torch.Tensor:
        """(K,) ``||P_k||`` of the prototypes as they are now."""
        P = ctx.prototypes
        return self._memoised("row_norms", ctx, P, lambda: torch.linalg.vector_norm(
            P.detach(), dim=-1, dtype=work_dtype(P.dtype)))

    def norm(self, ctx: Any) -> torch.Tensor:
        """0-dim ``||P||`` (Frobenius) as it is now."""
        P = ctx.prototypes
        return self._memoised("norm", ctx, P, lambda: self._total("row_norms", ctx, P))

    def _total(self, rows_name: str, ctx: Any, t: torch.Tensor) -> torch.Tensor:
        """||t|| from the memoised row norms ``rows_name`` if a monitor asked for them in this
        event, else one fused pass over t (exact either way)."""
        key = (rows_name, self._event, ctx.step, id(t), t.data_ptr(), _version(t))
        rows = self._memo.get(key)
        if rows is not None:
            return torch.linalg.vector_norm(rows)
        return torch.linalg.vector_norm(t.detach(), dtype=work_dtype(t.dtype))

    def sampled_row_norms(self, ctx: Any, idx: torch.Tensor) -> torch.Tensor:
        """(n,) ``||P_k||`` of the rows ``idx`` only (from the full row norms if they exist)."""
        P = ctx.prototypes
        return self._memoised(("sampled_row_norms", id(idx)), ctx, P, lambda: self._sampled(
            "row_norms", ctx, P, idx))

    def _sampled(self, rows_name: str, ctx: Any, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        key = (rows_name, self._event, ctx.step, id(t), t.data_ptr(), _version(t))
        rows = self._memo.get(key)
        if rows is not None:
            return rows.index_select(0, idx)
        return torch.linalg.vector_norm(sampled_rows(t.detach(), idx), dim=-1, dtype=work_dtype(t.dtype))

    # -- the gradient -----------------------------------------------------------------------
    @staticmethod
    def _grad(ctx: Any) -> Optional[torch.Tensor]:
        g = grad_of(ctx.prototypes)
        return None if g is None or g.is_sparse else g

    def grad_row_norms(self, ctx: Any) -> Optional[torch.Tensor]:
        """(K,) ``||grad_k||`` of the prototypes' gradient as it is now, or None."""
        g = self._grad(ctx)
        if g is None:
            return None
        return self._memoised("grad_row_norms", ctx, g, lambda: torch.linalg.vector_norm(
            g.detach(), dim=-1, dtype=work_dtype(g.dtype)))

    def grad_norm(self, ctx: Any) -> Optional[torch.Tensor]:
        """0-dim ``||grad||``, NaN/Inf iff an entry is; or None without a gradient."""
        g = self._grad(ctx)
        if g is None:
            return None
        return self._memoised("grad_norm", ctx, g, lambda: self._total("grad_row_norms", ctx, g))

    def sampled_grad_row_norms(self, ctx: Any, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """(n,) ``||grad_k||`` of the rows ``idx`` only, or None without a gradient."""
        g = self._grad(ctx)
        if g is None:
            return None
        return self._memoised(("sampled_grad_row_norms", id(idx)), ctx, g, lambda: self._sampled(
            "grad_row_norms", ctx, g, idx))

    # -- the update of optimizer.step() -------------------------------------------------------
    def snapshot(self, ctx: Any) -> torch.Tensor:
        """A copy of the prototypes, taken once per event (call it in ``on_before_optimizer_step``).

        Every caller of the same event gets the same buffer; it is overwritten by the next
        step's snapshot, so keep statistics of it, not the buffer.
        """
        P = ctx.prototypes.detach()
        key = (ctx.step, self._event, _version(P))
        snap = self._snap
        if snap is None or snap.shape != P.shape or snap.device != P.device or snap.dtype != P.dtype:
            self._snap = snap = torch.empty_like(P, memory_format=torch.contiguous_format)
            self._snap_key = None
        if self._snap_key != key or self._snap_spent:
            snap.copy_(P)
            self._snap_key = key
            self._snap_spent = False
        return snap

    def has_snapshot(self, ctx: Any) -> bool:
        """Whether :meth:`snapshot` ran during this step (before ``optimizer.step()``)."""
        return self._snap_key is not None and self._snap_key[0] == ctx.step

    def update_row_norms(self, ctx: Any) -> Optional[torch.Tensor]:
        """(K,) ``||P_k - snapshot_k||`` (call it in ``on_after_optimizer_step``), or None when no
        snapshot of this step exists or its shape no longer matches. Computed once per step (the
        update of the step's ``optimizer.step()``), in row blocks: no (K, D) temporary."""
        P = ctx.prototypes
        if self._update is not None and self._update[0] == (ctx.step, id(P), self._snap_key):
            return self._update[1]
        if not self.has_snapshot(ctx) or self._snap_spent or self._snap.shape != P.shape \
                or self._snap.device != P.device:
            return None
        # a row moved iff its update norm is > 0 (exact: an element change small enough for its
        # square to underflow would need |P_kd| < ~1e-19)
        Pd, snap = P.detach(), self._snap
        if snap.dtype == work_dtype(snap.dtype) and Pd.dtype == snap.dtype \
                and P.shape[0] <= block_rows(P.shape, P.device):
            # one block (small K): the difference in place of the snapshot, which every monitor
            # has read through the update by now: no scratch buffer to pull through the cache
            snap.sub_(Pd)
            self._snap_spent = True
            per = torch.linalg.vector_norm(snap.reshape(snap.shape[0], -1), dim=1)
        else:
            per = self.distances(Pd, snap)
        self._update = ((ctx.step, id(P), self._snap_key), per)
        return per

    def distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(K,) ``||a_k - b_k||`` through this run's small reused scratch (:func:`row_distances`)."""
        per, self._scratch = row_distances(a, b, self._scratch)
        return per

    def update_norm(self, ctx: Any) -> Optional[torch.Tensor]:
        """0-dim ``||P - snapshot||``, or None (see :meth:`update_row_norms`)."""
        per = self.update_row_norms(ctx)
        if per is None:
            return None
        key = ("update_norm", ctx.step, id(per))
        if key not in self._memo:
            self._memo[key] = torch.linalg.vector_norm(per)
        return self._memo[key]
