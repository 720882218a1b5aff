"""Watch the prototypes of a LightningModule with one callback.

    from monitors.integrations.lightning import PrototypeMonitorCallback
    trainer = L.Trainer(callbacks=[PrototypeMonitorCallback("head.prototypes")])

Lightning hook -> protowatch event:

============================ ==========================================================================
Lightning hook               event
============================ ==========================================================================
on_fit_start                 (builds the hub: prototypes resolved in the module, the optimizer holding
                             them, rank / world size from the trainer, the W&B run)
on_train_start               on_load_checkpoint (when resuming), then on_train_start
on_after_backward            on_after_backward, once per optimizer step (at the
                             ``accumulate_grad_batches``-th backward)
on_before_optimizer_step     on_before_optimizer_step (note: Lightning calls it before its own
                             gradient clipping)
on_train_batch_end           on_after_optimizer_step, then on_step_end with the training_step outputs
on_validation_batch_end      collects ``projections`` (or ``embeddings``) and ``labels`` returned by
                             validation_step ...
on_validation_epoch_end      ... and emits on_embeddings with them
on_save_checkpoint           on_save_checkpoint via ``hub.check_checkpoint(checkpoint)``; the hub's
                             state goes into ``checkpoint["callbacks"][state_key]``
on_train_end / on_exception  on_train_end, flush, close
============================ ==========================================================================

``training_step`` may return a dict: ``loss`` plus any :class:`~monitors.core.events.StepOutputs` field
(``student_probs``, ``teacher_targets``, ``projections``, ``embeddings``, ``labels``, ``terms``,
``schedules``); other 0-dim tensors go to ``terms``. ``capture="module"`` works as in
:func:`monitors.attach`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "monitors.integrations.lightning needs Lightning 2.x: pip install lightning"
    ) from exc

from ..attaching.attached_hub import AttachedHub
from ..attaching.api import OPTIONS, build_hub, split_options
from ..core.events import StepOutputs
from ..core.registry import MonitorSpec
from ..attaching.resolve import resolve_prototypes

_FIELDS = set(StepOutputs.__dataclass_fields__)
#: rows of validation projections kept for one on_embeddings (the t-SNE subsamples further)
MAX_EMBEDDINGS = 4096


class PrototypeMonitorCallback(Callback):
    """Runs the protowatch monitors on the prototypes of a LightningModule.

    Args:
        prototypes: dotted attribute path in the LightningModule (``"prototypes"``,
            ``"head.prototypes"``, ``"head.last_layer"``), resolved as in :func:`monitors.attach`:
            a layer module means its weight (weight-normalised layers: the direction v).
        monitors: ``"default"``, a list of names / Monitor instances, or ``{name: options}``.
        run: None -> the W&B run of the trainer's ``WandbLogger`` if there is one, else an
            offline run under ``dir`` / ``exp_dir`` / ``trainer.default_root_dir``; a wandb Run is
            used as is; False -> no W&B.
        **options: as for :func:`monitors.attach` (``log_every``, ``exp_dir``, ``freeze_steps``,
            ``capture``, ``sinks``, ``<monitor>=dict(...)``, ...). ``accumulate_grad_batches``
            defaults to the trainer's. ``teacher="teacher"`` is the attribute path of the EMA
            teacher in the LightningModule (TEACHER_SHARES_STUDENT, TEACHER_NOT_UPDATING);
            ``freeze_steps`` declares an intended freeze (PROTO_FREEZE_IGNORED if they move).
    """

    def __init__(self, prototypes: str = "prototypes", monitors: MonitorSpec = "default", run: Any = None,
                 **options: Any) -> None:
        if not isinstance(prototypes, str):
            raise TypeError("PrototypeMonitorCallback(prototypes=...) is the attribute path of the prototypes in "
                            f"the LightningModule, e.g. 'head.prototypes'; got {type(prototypes).__name__}")
        split_options(options)  # unknown options fail now, not at fit time
        self.prototypes = prototypes
        self.monitors = monitors
        self.run = run
        self.options = dict(options)
        self.hub: Optional[AttachedHub] = None
        self._pending_state: Optional[Mapping[str, Any]] = None
        self._pending_load: Optional[dict] = None
        self._stepped = False
        self._val_proj: list[torch.Tensor] = []
        self._val_labels: list[Any] = []  # per batch: a label tensor or a list

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prototypes=self.prototypes)

    # -- building ---------------------------------------------------------------------------
    def _wandb_run(self, trainer: "pl.Trainer") -> Any:
        if self.run is not None:
            return self.run
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.global_rank == 0:
                return logger.experiment
        return None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Attach the hub to the module's optimizer and prototypes (once per fit)."""
        if self.hub is not None:
            return
        tensor, _ = resolve_prototypes(self.prototypes, pl_module)
        optimizers = list(trainer.optimizers)
        optimizer = next((o for o in optimizers if any(p is tensor for g in o.param_groups for p in g["params"])),
                         optimizers[0] if optimizers else None)
        options = dict(self.options)
        options.setdefault("accumulate_grad_batches", int(trainer.accumulate_grad_batches))
        self.hub = build_hub(optimizer, self.prototypes, model=pl_module, run=self._wandb_run(trainer),
                             monitors=self.monitors, rank=trainer.global_rank, world_size=trainer.world_size,
                             install_hooks=False, wandb_dir=str(trainer.default_root_dir), options=options)
        self.hub.ctx.extra["integration"] = "lightning"
        if self._pending_state is not None:
            self.hub.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Emit ``on_train_start``: the static checks report now."""
        hub = self._require()
        hub.ctx.step = int(trainer.global_step)
        hub.ctx.epoch = int(trainer.current_epoch)
        if self._pending_load is not None:
            checkpoint, self._pending_load = self._pending_load, None
            hub.emit_with("on_load_checkpoint", hub.ctx, checkpoint=checkpoint)
        hub.start()

    def _require(self) -> AttachedHub:
        if self.hub is None:
            raise RuntimeError("PrototypeMonitorCallback: no hub yet (on_fit_start did not run)")
        return self.hub

    # -- steps ------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Keep ``ctx.epoch`` in step with the trainer."""
        if self.hub is not None:
            self.hub.ctx.epoch = int(trainer.current_epoch)

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A backward pass finished: ``backward_done`` (the event at the accumulation boundary)."""
        if self.hub is not None and not self.hub.closed:
            self.hub.backward_done()

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        """Right before ``optimizer.step()``: ``optimizer_step_starting`` (gradients final)."""
        hub = self.hub
        if hub is None or hub.closed or self._stepped:
            return  # a second optimizer in the same batch: the first one drives the events
        if hub.ctx.optimizer is not None and _unwrap(optimizer) is not hub.ctx.optimizer:
            return
        self._stepped = True
        hub.optimizer_step_starting()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """After the step: ``optimizer_step_done`` with the training step's outputs."""
        hub = self.hub
        if hub is None or not self._stepped:
            return  # an accumulation batch: no optimizer step yet
        self._stepped = False
        hub.optimizer_step_done(_step_fields(outputs))
        if hub.should_stop:
            trainer.should_stop = True

    # -- validation -> on_embeddings ---------------------------------------------------------
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Collect the head outputs and labels of a validation batch for the t-SNE frame."""
        if self.hub is None or trainer.sanity_checking or not isinstance(outputs, Mapping):
            return
        proj = outputs.get("projections", outputs.get("embeddings"))
        labels = outputs.get("labels")
        if not isinstance(proj, torch.Tensor) or labels is None or sum(len(p) for p in self._val_proj) >= MAX_EMBEDDINGS:
            return
        self._val_proj.append(proj.detach().reshape(-1, proj.shape[-1]))
        # tensors stay on the device until the epoch ends (no sync per batch)
        self._val_labels.append(labels.detach().reshape(-1) if isinstance(labels, torch.Tensor) else list(labels))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Hand the validation projections and labels to ``on_embeddings`` (the t-SNE frame)."""
        proj, labels = self._val_proj, self._val_labels
        self._val_proj, self._val_labels = [], []
        if self.hub is None or self.hub.closed or not proj or trainer.sanity_checking:
            return
        emb = torch.cat(proj)
        labels = [x for chunk in labels
                  for x in (chunk.cpu().tolist() if isinstance(chunk, torch.Tensor) else chunk)]
        if len(labels) == emb.shape[0] and emb.shape[1] == self.hub.ctx.prototypes.shape[1]:
            self.hub.log_embeddings(emb, labels)

    # -- checkpoints and state -----------------------------------------------------------------
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """Check the dict Lightning is about to write (``hub.check_checkpoint``: ``on_save_checkpoint``)."""
        if self.hub is not None:
            self.hub.check_checkpoint(checkpoint)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """Keep the dict Lightning just read: ``on_load_checkpoint`` follows at ``on_train_start``."""
        self._pending_load = checkpoint  # emitted at on_train_start, once the weights are restored

    def state_dict(self) -> dict[str, Any]:
        """The hub's state, saved by Lightning with the checkpoint."""
        if self.hub is not None:
            return self.hub.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the hub's state (kept until the hub exists if it does not yet)."""
        if self.hub is not None:
            self.hub.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict

    # -- end --------------------------------------------------------------------------------
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Emit ``on_train_end`` and close the hub (flush, finish background work)."""
        if self.hub is not None:
            self.hub.close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Close the hub so nothing buffered is lost when training raises."""
        if self.hub is not None:
            self.hub.close()

    @property
    def findings(self) -> list:
        return [] if self.hub is None else self.hub.findings


def _unwrap(optimizer: Any) -> Any:
    """LightningOptimizer -> the torch optimizer."""
    return getattr(optimizer, "optimizer", getattr(optimizer, "_optimizer", optimizer))


def _step_fields(outputs: Any) -> dict[str, Any]:
    """training_step outputs -> StepOutputs fields (other 0-dim tensors become ``terms``)."""
    if isinstance(outputs, torch.Tensor):
        return {"loss": outputs}
    if not isinstance(outputs, Mapping):
        return {}
    fields = {k: v for k, v in outputs.items() if k in _FIELDS}
    terms = {k: v for k, v in outputs.items()
             if k not in _FIELDS and isinstance(v, torch.Tensor) and v.dim() == 0}
    if terms:
        fields["terms"] = {**terms, **dict(fields.get("terms") or {})}
    return fields


__all__ = ["PrototypeMonitorCallback", "OPTIONS"]
