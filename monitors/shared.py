"""Work several monitors need from the same prototypes at the same moment, done once.

The norms, gradient, delta, evolution and health monitors all read the prototypes, their
gradient and the update of the step. Each pass over a (K, D) tensor is cheap, but a dozen of them
per step is a measurable share of a small model's step. :class:`SharedComputations` (one per
run, ``ctx.shared``) memoises them within one event: the hub calls :meth:`next_event` before
each dispatch, so a value is reused only by monitors of the same event, never across an
``optimizer.step()`` or any other change to the tensors, including ``.data`` writes that
PyTorch's version counter does not see. Within an event the key also holds the tensor's
version counter, so hooks called directly (without a hub) see in-place changes too.

Everything stays on the prototypes' device; nothing here reads a value on the host.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors do not count versions
        return -1


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 prototypes (norms of low-precision tensors in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_of(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t.grad`` without the warning PyTorch prints for a non-leaf tensor (which has none)."""
    if not t.is_leaf and not t.retains_grad:
        return None
    return t.grad


class SharedComputations:
    """Per-event memo of prototype statistics; see the module docstring.

    Methods take the run context and return device tensors, or None when the tensor they need
    does not exist (no gradient, no snapshot this step).
    """

    def __init__(self) -> None:
        self._event = 0
        self._memo: dict[tuple, Any] = {}
        self._snap: Optional[torch.Tensor] = None      # (K, D) prototypes before step()
        self._snap_key: Optional[tuple] = None         # (step, event) of the snapshot
        self._scratch: Optional[torch.Tensor] = None   # (K, D) work buffer

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
        return self._memoised("norm", ctx, P, lambda: torch.linalg.vector_norm(self.row_norms(ctx)))

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
        return self._memoised("grad_norm", ctx, g, lambda: torch.linalg.vector_norm(self.grad_row_norms(ctx)))

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
        if self._snap_key != key:
            snap.copy_(P)
            self._snap_key = key
        return snap

    def has_snapshot(self, ctx: Any) -> bool:
        """Whether :meth:`snapshot` ran during this step (before ``optimizer.step()``)."""
        return self._snap_key is not None and self._snap_key[0] == ctx.step

    def update_row_norms(self, ctx: Any) -> Optional[torch.Tensor]:
        """(K,) ``||P_k - snapshot_k||`` (call it in ``on_after_optimizer_step``), or None when no
        snapshot of this step exists or its shape no longer matches."""
        P = ctx.prototypes
        if not self.has_snapshot(ctx) or self._snap.shape != P.shape or self._snap.device != P.device:
            return None

        def compute() -> torch.Tensor:
            dt = work_dtype(P.dtype)
            s = self._scratch
            if s is None or s.shape != P.shape or s.device != P.device or s.dtype != dt:
                self._scratch = s = torch.empty(P.shape, device=P.device, dtype=dt)
            torch.sub(P.detach(), self._snap, out=s)
            # a row moved iff its update norm is > 0 (exact: an element change small enough for
            # its square to underflow would need |P_kd| < ~1e-19)
            return torch.linalg.vector_norm(s, dim=-1)

        return self._memoised("update_row_norms", ctx, P, compute)

    def update_norm(self, ctx: Any) -> Optional[torch.Tensor]:
        """0-dim ``||P - snapshot||``, or None (see :meth:`update_row_norms`)."""
        per = self.update_row_norms(ctx)
        if per is None:
            return None
        return self._memoised("update_norm", ctx, ctx.prototypes, lambda: torch.linalg.vector_norm(per))
