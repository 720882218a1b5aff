"""The hub that :func:`monitors.attach` returns: a :class:`MonitorHub` driving its own events
from PyTorch's hooks on a foreign loop (see :mod:`monitors.attaching.api` for which hook gives which
event)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..core.cadence import Every
from ..core.events import RunContext, StepOutputs
from ..core.finding import Finding
from ..core.hub import MonitorHub, _print_console
from ..core.options import number_in, optional_positive_int, positive_int
from ..core.proto_stats import assignment_rows
from ..health.checkpoint_check import check_checkpoint
from ..health.optimizer_lookup import ProtoGroup
from .capture import (INPUT, CaptureChoice, Discovery, EvalCapture, auto_capture_every, detach_value, soft_assignments,
                      stack_outputs)
from .scaled_steps import ScalerWatch

__all__ = ["AttachedHub"]

_OWNER = "attach()"
_STEP_FIELDS = set(StepOutputs.__dataclass_fields__)
#: captured training-mode outputs kept per step
_MAX_CHUNKS = 64


class AttachedHub(MonitorHub):
    """A :class:`MonitorHub` that drives its own events from hooks on a foreign loop.

    Adds to the hub: :meth:`detach`, :meth:`log_embeddings`, :meth:`capture`,
    :meth:`log_outputs`, :meth:`check_checkpoint`, and ``step`` in :meth:`state_dict`.
    Integrations without PyTorch hooks (the Lightning callback) call :meth:`backward_done`,
    :meth:`optimizer_step_starting` and :meth:`optimizer_step_done` themselves.
    """

    def __init__(self, ctx: RunContext, monitors: Sequence[Any] = (), sinks: Sequence[Any] = (), *,
                 log_every: int = 10, stop_on_error: bool = False,
                 console: Optional[Callable[[str], None]] = _print_console,
                 capture: Optional[tuple[nn.Module, str, Any]] = None,
                 accumulate_grad_batches: int = 1, assign_temperature: float = 0.1,
                 install_hooks: bool = True, auto_capture: bool = False,
                 capture_every: Optional[int] = None) -> None:
        super().__init__(monitors, sinks, log_every=log_every, stop_on_error=stop_on_error, console=console)
        self.accumulate_grad_batches = positive_int(_OWNER, "accumulate_grad_batches", accumulate_grad_batches)
        self.assign_temperature = number_in(_OWNER, "assign_temperature", assign_temperature, 0.0)
        if self.assign_temperature == 0.0:
            raise ValueError(f"{_OWNER}: assign_temperature must be > 0, got {assign_temperature!r}")
        capture_every = optional_positive_int(_OWNER, "capture_every", capture_every)
        if capture_every is None:
            capture_every = auto_capture_every(ctx) if auto_capture and capture is None else 1
        self.capture_every = capture_every
        self._capture_cadence = Every(capture_every, _OWNER, "capture_every")
        self.ctx = ctx
        self._capture = capture
        self._handles: list[Any] = []
        self._n_backward = 0              # backward passes since the last optimizer step
        self._backward_emitted = False    # on_after_backward emitted for the current step
        self._step_chunks: list[torch.Tensor] = []   # captured training-mode outputs of this step
        self._eval_chunks: Optional[list[torch.Tensor]] = None  # inside `with hub.capture()`
        self._explicit: dict[str, Any] = {}          # hub.log_outputs(...) for this step
        self._assign: Optional[torch.Tensor] = None  # (N, K) derived at the pre-step hook
        self._proto_group = ProtoGroup()      # the prototypes' param group (train/lr, train/wd)
        self._scaling = ScalerWatch()          # the loop's GradScaler, if any
        self._boundary: Optional[tuple[int, dict[str, Any]]] = None  # (chunks, outputs) at a scaled boundary
        self.skipped_steps = 0                 # steps the scaler skipped on inf/NaN: not counted, not logged
        self._started = False
        self._discovery: Optional[Discovery] = (
            Discovery(ctx.model, ctx.prototypes, self._install_capture, teacher=ctx.teacher)
            if auto_capture and capture is None and isinstance(ctx.model, nn.Module) else None)
        self._install_hooks(optimizer_hooks=install_hooks)

    def _capture_due(self) -> bool:
        """Whether the training-mode outputs of the current step are captured (``capture_every``)."""
        return self._capture_cadence.due(self.ctx.step)

    def _install_capture(self, choice: CaptureChoice) -> None:
        """Say what the automatic capture chose and capture it from now on (``choice.chunks``:
        what it already gave in this step)."""
        if self.console is not None and self.ctx.is_main_process:
            self.console(choice.message)
        if choice.module is None:
            return
        key = choice.key
        self._capture = (choice.module, choice.name if key is None else f"{choice.name}:{key}", key)
        self._handles.append(choice.module.register_forward_hook(self._on_forward))
        if self._eval_chunks is None and self._capture_due():
            self._step_chunks.extend(choice.chunks[:_MAX_CHUNKS])

    # -- hooks ------------------------------------------------------------------------------
    def _install_hooks(self, optimizer_hooks: bool = True) -> None:
        ctx = self.ctx
        p = ctx.prototypes
        if optimizer_hooks:
            if p.is_leaf and p.requires_grad:  # otherwise the pre-step hook emits on_after_backward
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            if ctx.optimizer is not None:
                self._handles.append(ctx.optimizer.register_step_pre_hook(
                    lambda opt, args, kwargs: self.optimizer_step_starting()))
                self._handles.append(ctx.optimizer.register_step_post_hook(
                    lambda opt, args, kwargs: self.optimizer_step_done()))
        if self._capture is not None:
            self._handles.append(self._capture[0].register_forward_hook(self._on_forward))
        elif self._discovery is not None and not self._discovery.done:
            self._handles.extend(self._discovery.install())

    def _on_grad(self, param: torch.Tensor) -> None:
        # runs inside backward: the other gradients are not accumulated yet, so wait for the end
        queue = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None)
        if queue is not None:
            queue(self.backward_done)
        else:  # pragma: no cover - older engines
            self.backward_done()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        key = self._capture[2] if self._capture is not None else None
        out = output
        if key == INPUT:  # the prototype layer's input: the projections
            out = args[0] if args else None
        elif key is not None:  # "name:i" / "name:key" picks from a tuple, list or dict output
            try:
                out = output[key] if isinstance(output, (tuple, list, Mapping)) else None
            except (IndexError, KeyError):
                out = None
        if not isinstance(out, torch.Tensor):
            return
        out = out.detach()
        if self._eval_chunks is not None:
            self._eval_chunks.append(out)
        elif module.training and len(self._step_chunks) < _MAX_CHUNKS and self._capture_due():
            self._step_chunks.append(out)

    # -- driving the events ------------------------------------------------------------------
    def start(self) -> None:
        """Emit ``on_train_start`` (once): the static checks report now."""
        if not self._started:
            self._started = True
            self.emit("on_train_start", self.ctx)

    # The step is driven by MonitorHub's verbs (after_backward, before_step, after_step,
    # end_step), as in the pipeline's loop; here they also keep the accumulation boundary, the
    # capture and the step counter. The PyTorch hooks call backward_done and the two below.
    def backward_done(self) -> None:
        """A backward pass finished: :meth:`after_backward` at the accumulation boundary (under a
        GradScaler: at ``optimizer.step()``, once the gradients are unscaled)."""
        if self._discovery is not None and not self._discovery.done:
            self._install_capture(self._discovery.choose())  # every forward pass of the step has run
        if self._scaling.backward_is_scaled():  # scaled gradients: after_backward waits for optimizer.step()
            if self._n_backward >= self.accumulate_grad_batches:  # the last boundary had no step: skipped
                self._forget_skipped_step()
            self._n_backward += 1
            if self._n_backward >= self.accumulate_grad_batches:
                self._boundary = (len(self._step_chunks), dict(self._explicit))
            return
        self._n_backward += 1
        if not self._backward_emitted and self._n_backward >= self.accumulate_grad_batches:
            self.after_backward()

    def after_backward(self, ctx: Optional[RunContext] = None) -> None:
        self._backward_emitted = True
        super().after_backward(ctx)

    def before_step(self, ctx: Optional[RunContext] = None) -> None:
        """Right before ``optimizer.step()``: parameters still old, gradients final (unscaled)."""
        # a GradScaler found only now: redo the gradient work on the unscaled gradients
        rerun = self._scaling.at_step(self.ctx.extra) and self._backward_emitted
        self._boundary = None
        if not self._backward_emitted or rerun:
            self.after_backward(ctx)
        if self._discovery is not None and not self._discovery.done:
            self._install_capture(self._discovery.choose())  # the model itself was never called: choose from what ran
        self._assign = self._derive_assignments()
        super().before_step(ctx)

    def end_step(self, outputs: Union[StepOutputs, Mapping[str, Any], None] = None,
                 ctx: Optional[RunContext] = None, **values: Any) -> None:
        """The end of the step, with its outputs: what was captured and given to
        :meth:`log_outputs`, updated by ``outputs`` (a :class:`StepOutputs` or a dict of its
        fields); then ``ctx.step`` advances."""
        ctx = ctx or self.ctx
        if isinstance(outputs, StepOutputs):  # its fields that hold something
            outputs = {f: v for f in _STEP_FIELDS if (v := getattr(outputs, f)) is not None and not (
                isinstance(v, Mapping) and not v)}
        super().end_step(self._step_outputs(outputs), ctx, **values)
        self._capture_cadence.fire(ctx.step)
        ctx.step += 1
        self._n_backward = 0
        self._backward_emitted = False
        self._step_chunks = []
        self._explicit = {}
        self._assign = None

    def optimizer_step_starting(self) -> None:
        """What the optimizer's pre-step hook calls: :meth:`before_step`."""
        self.before_step()

    def optimizer_step_done(self, outputs: Optional[Mapping[str, Any]] = None) -> None:
        """What the optimizer's post-step hook calls: :meth:`after_step`, then :meth:`end_step`
        with ``outputs`` (a dict of StepOutputs fields)."""
        self.after_step()
        self.end_step(outputs)

    # -- step outputs -----------------------------------------------------------------------
    def log_outputs(self, **fields: Any) -> None:
        """Hand step outputs to the monitors (optional): any :class:`StepOutputs` field, e.g.
        ``hub.log_outputs(loss=loss, student_probs=p, teacher_targets=t, labels=y)``. Tensors are
        detached; they go into the ``StepOutputs`` of the current step: call before
        ``optimizer.step()`` (its post-hook ends the step)."""
        bad = set(fields) - _STEP_FIELDS
        if bad:
            raise ValueError(f"log_outputs: unknown fields {sorted(bad)}; valid: {', '.join(sorted(_STEP_FIELDS))}")
        for k, v in fields.items():
            self._explicit[k] = detach_value(v)

    def _derive_assignments(self) -> Optional[torch.Tensor]:
        """(N, K) soft assignments of the captured outputs to the (current) prototypes, on the device."""
        if not self._step_chunks or "student_probs" in self._explicit:
            return None
        x = stack_outputs(self._step_chunks)
        K, D = self.ctx.prototypes.shape
        if x.shape[-1] == D:
            self._explicit.setdefault("projections", x)
        rows = assignment_rows(K)
        if x.shape[0] > rows:  # large K: the first rows only (a batch's rows are random samples)
            x = x[:rows]
            self.log({"proto/usage/sampled": float(rows)}, step=self.ctx.step)
        return soft_assignments(x, self.ctx.prototypes, self.assign_temperature)

    def _schedules(self) -> dict[str, float]:
        """lr and wd of the prototypes' param group (``train/lr``, ``train/wd``)."""
        g = self._proto_group.group(self.ctx.optimizer, self.ctx.prototypes)
        return {name: float(g[key]) for key, name in (("lr", "lr"), ("weight_decay", "wd"))
                if g is not None and isinstance(g.get(key), (int, float))}

    def _forget_skipped_step(self) -> None:
        """The scaler skipped the last step (no ``optimizer.step()``): drop what was captured for
        it; it is neither counted nor logged."""
        n, explicit = self._boundary or (0, {})
        del self._step_chunks[:n]
        self._explicit = {k: v for k, v in self._explicit.items() if explicit.get(k) is not v}
        self._n_backward = 0
        self._backward_emitted = False
        self._assign = None
        self._boundary = None
        self.skipped_steps += 1

    def _step_outputs(self, outputs: Optional[Mapping[str, Any]]) -> StepOutputs:
        fields: dict[str, Any] = {}
        if self._assign is None and self._step_chunks:  # captured after the pre-step hook
            self._assign = self._derive_assignments()
        if self._assign is not None:
            fields["student_probs"] = self._assign
        fields.update(self._explicit)
        if outputs:
            fields.update({k: detach_value(v) for k, v in outputs.items() if k in _STEP_FIELDS})
        fields["schedules"] = {**self._schedules(), **dict(fields.get("schedules") or {})}
        return StepOutputs(**fields)

    # -- embeddings -------------------------------------------------------------------------
    def log_embeddings(self, embeddings: torch.Tensor, labels: Optional[Sequence[Any]] = None,
                       step: Optional[int] = None) -> None:
        """Emit ``on_embeddings`` with (N, D) embeddings in the prototypes' space (the head
        output) and their N labels (t-SNE of prototypes vs embeddings)."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("log_embeddings: embeddings must be an (N, dim) tensor, got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
        D = self.ctx.prototypes.shape[1]
        if embeddings.shape[1] != D:
            raise ValueError(f"log_embeddings: embeddings have dim {embeddings.shape[1]} but the prototypes "
                             f"have dim {D}; pass the head outputs (the prototypes' space), not the backbone's")
        if labels is not None and len(labels) != embeddings.shape[0]:
            raise ValueError(f"log_embeddings: {embeddings.shape[0]} embeddings but {len(labels)} labels")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().tolist()
        ctx = self.ctx
        saved = ctx.step
        if step is not None:
            ctx.step = int(step)
        try:
            self.emit_with("on_embeddings", ctx, embeddings=embeddings.detach(),
                           labels=list(labels) if labels is not None else None)
        finally:
            ctx.step = saved

    @contextlib.contextmanager
    def capture(self, labels: Optional[Sequence[Any]] = None) -> Iterator["EvalCapture"]:
        """Collect the outputs of the ``capture=`` module during an eval loop, then emit
        ``on_embeddings`` at the end of the block::

            with hub.capture() as cap:
                for x, y in val_loader:
                    model(x); cap.add_labels(y)

        Labels may instead be given at once: ``hub.capture(labels=all_labels)``.
        """
        if self._capture is None:
            raise ValueError("hub.capture() needs attach(..., capture='<module name>'): the module whose "
                             "output is the projection (found automatically at the first training step when "
                             "model= is given); or call hub.log_embeddings(embeddings, labels)")
        cap = EvalCapture(labels)
        self._eval_chunks = []
        try:
            yield cap
            chunks = self._eval_chunks
        finally:
            self._eval_chunks = None
        if chunks:
            emb = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
            lab = cap.labels if cap.labels else None
            if lab is not None and len(lab) != emb.shape[0]:
                raise ValueError(f"hub.capture: {emb.shape[0]} outputs were captured but {len(lab)} labels given")
            self.log_embeddings(emb, lab)

    # -- checkpoints ------------------------------------------------------------------------
    def check_checkpoint(self, checkpoint: Union[Mapping[str, Any], str, os.PathLike],
                         resumed: bool = False, trust_pickle: bool = False) -> list[Finding]:
        """Check that a checkpoint (a dict, or a path loaded on the CPU) holds the current
        prototypes (``PROTO_NOT_IN_CHECKPOINT``, error) and their optimizer state
        (``PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT``, warning). Emits ``on_save_checkpoint``.
        ``resumed=True``: the run was just resumed from it: emits ``on_load_checkpoint``, and a
        prototype tensor there that differs from the live one is reported as "not restored"
        (warning) rather than missing. Returns the findings about this checkpoint (also when
        already reported earlier). A path is loaded with ``weights_only=True`` (no pickle code
        runs; :func:`monitors.formats.checkpoints.load_checkpoint`): one that needs arbitrary pickle raises
        ``UnsafeCheckpointError`` unless ``trust_pickle=True``."""
        from ..formats.checkpoints import load_checkpoint
        from ..health.doctor import HealthDoctor

        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = load_checkpoint(checkpoint, trust_pickle=trust_pickle, mmap=False)
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"check_checkpoint expects a dict or a path, got {type(checkpoint).__name__}")
        ctx = self.ctx
        doctors = [m for m in self.monitors if isinstance(m, HealthDoctor)]
        for d in doctors:
            d.checkpoint_findings = None
        n_before = len(self.findings)
        if not self.closed:  # after close() the answer is still given, nothing is written
            self.emit_with("on_load_checkpoint" if resumed else "on_save_checkpoint", ctx, checkpoint=checkpoint)
        found = list(self.findings[n_before:])
        # the doctor's answer to this checkpoint: it reports a code once per run, the answer is per call
        answer = next((d.checkpoint_findings[1] for d in doctors
                       if d.checkpoint_findings is not None and d.checkpoint_findings[0] == id(checkpoint)), None)
        if answer is None:  # no doctor ran: none is watching, it was switched off, or the hub is closed
            answer = check_checkpoint(checkpoint, ctx.prototypes, step=ctx.step, loaded=resumed,
                                      name=ctx.extra.get("prototypes_name"), optimizer=ctx.optimizer)
            if not self.closed:
                for f in answer:
                    self.report(f)
        for f in answer:
            if all(g.code != f.code for g in found):
                found.append(f)
        return found

    # -- state and end ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The hub's state plus the step and epoch counters and the capture schedule."""
        state = super().state_dict()
        state["step"] = int(self.ctx.step)
        state["epoch"] = int(self.ctx.epoch)
        state["capture_cadence"] = self._capture_cadence.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the monitors, the findings, the step, epoch and capture schedule)."""
        super().load_state_dict(state)
        self.ctx.step = int(state.get("step", self.ctx.step))
        self.ctx.epoch = int(state.get("epoch", self.ctx.epoch))
        if "capture_cadence" in state:
            self._capture_cadence.load_state_dict(state["capture_cadence"])

    def detach(self) -> None:
        """Remove every hook: after this, the loop emits nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._discovery is not None:
            self._discovery.handles = []

    def reattach(self) -> None:
        """Install the hooks again after :meth:`detach` (e.g. to watch only part of a run)."""
        if self.closed:
            raise RuntimeError("this hub is closed: call attach() again for a new one")
        if not self._handles:
            self._install_hooks()

    def close(self) -> None:
        """Detach, emit ``on_train_end``, flush, finish background work, close the sinks."""
        if self.closed:
            return
        self.detach()
        self.emit("on_train_end", self.ctx)
        super().close()
