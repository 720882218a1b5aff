"""Building a training run from its config, in the order :func:`pipeline.train.train` calls
these: the device and process group, the data, the networks and prototypes, the loss, the
optimizer, mixed precision, and the monitor hub with its sinks (the schedules:
:mod:`pipeline.schedules`)."""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from monitors import MonitorHub, build_monitors
from monitors.core.distributed import rank_and_world
from monitors.formats.sinks import WandbSink, build_sinks

from .config import Config
from .data import KaldiDir, SDPNTrainSet, ensure_synthetic_corpus, read_kaldi_dir
from .loss import SDPNLoss
from .models import build_model, init_prototypes, param_groups


# ----------------------------------------------------------------------------------------------
# device and process group
# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); (rank, world)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return rank_and_world()


def finish_distributed(world: int) -> None:
    """Every rank done (rank 0 may still be evaluating), then the group is torn down together."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def resolve_data(cfg: Config) -> tuple[Path, Optional[Path]]:
    """The training and evaluation directories; the built-in corpus is generated on first use."""
    need_builtin = cfg.data == "builtin" or cfg.eval_data == "builtin"
    builtin: dict[str, Path] = {}
    if need_builtin:
        builtin = ensure_synthetic_corpus(
            cfg.data_cache, seed=cfg.corpus_seed, num_train_speakers=cfg.num_train_speakers,
            num_eval_speakers=cfg.num_eval_speakers, utts_per_speaker=cfg.utts_per_speaker,
            utt_seconds=cfg.utt_seconds)
    train_dir = builtin["train"] if cfg.data == "builtin" else Path(cfg.data)
    eval_dir = None if not cfg.eval_data else (builtin["eval"] if cfg.eval_data == "builtin" else Path(cfg.eval_data))
    return train_dir, eval_dir


def load_data(cfg: Config, rank: int, world: int) -> tuple[SDPNTrainSet, Optional[KaldiDir], int, int]:
    """(training set, evaluation data or None, steps per epoch, total steps). Rank 0 generates
    the built-in corpus; every rank reads the same directories."""
    train_dir, eval_dir = resolve_data(cfg) if rank == 0 else (None, None)
    if world > 1:
        paths = [str(train_dir), str(eval_dir) if eval_dir else ""]
        dist.broadcast_object_list(paths, src=0)
        train_dir, eval_dir = Path(paths[0]), (Path(paths[1]) if paths[1] else None)
    trainset = SDPNTrainSet(train_dir, max_frames=cfg.max_frames, glb_num=cfg.glb_num,
                            local_num=cfg.local_num, aug_prob=cfg.aug_prob,
                            snr_range=(cfg.snr_min, cfg.snr_max), seed=cfg.seed + rank,
                            noise_data=cfg.noise_data or None, rir_data=cfg.rir_data or None)
    trainset.check_first_file()  # a wrong sample rate fails here, not at step 1
    eval_data = read_kaldi_dir(eval_dir, require_trials=True) if eval_dir is not None else None
    per_epoch = len(trainset) // (cfg.batch_size * world)
    if per_epoch < 1:
        raise ValueError(f"the training data has {len(trainset)} utterances, fewer than one batch of "
                         f"{cfg.batch_size} x {world} processes: lower batch_size or add data")
    total_steps = cfg.epochs * per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return trainset, eval_data, per_epoch, total_steps


# ----------------------------------------------------------------------------------------------
# networks, prototypes, loss, optimizer, precision
# ----------------------------------------------------------------------------------------------
def make_prototypes(cfg: Config, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    protos = init_prototypes(cfg.num_proto, cfg.output_dim, generator=g).detach()
    if cfg.bug_non_leaf_prototypes:
        # The trap of the original: Parameter(x).cuda() is a plain non-leaf copy, not a Parameter.
        return torch.nn.Parameter(protos).to(device, copy=True)
    return protos.to(device).requires_grad_(True)


def build_networks(cfg: Config, device: torch.device, world: int
                   ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(student, EMA teacher, the student as the forward pass calls it (DDP when world > 1),
    prototypes (K, D)); the prototypes start equal on every rank."""
    student = build_model(channels=cfg.channels, embed_dim=cfg.embed_dim, scale=cfg.scale,
                          output_dim=cfg.output_dim, hidden_dim=cfg.hidden_dim,
                          nlayers=cfg.head_layers).to(device)
    teacher = student if cfg.bug_teacher_shares_student else copy.deepcopy(student)
    for p in teacher.parameters() if teacher is not student else ():
        p.requires_grad_(False)
    prototypes = make_prototypes(cfg, device)
    if world == 1:
        return student, teacher, student, prototypes
    with torch.no_grad():
        dist.broadcast(prototypes.data if prototypes.is_leaf else prototypes, src=0)
    if device.type == "cuda":
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student_ddp = torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None)
    return student, teacher, student_ddp, prototypes


def build_loss(cfg: Config) -> SDPNLoss:
    return SDPNLoss(tau=cfg.tau, teacher_temp=cfg.teacher_temp, sinkhorn_iters=cfg.sinkhorn_iters,
                    memax_weight=cfg.memax_weight, koleo_weight=cfg.koleo_loss_weight,
                    koleo_reduction="sum")  # as 3D-Speaker: summed over the local views


def build_optimizer(cfg: Config, student: torch.nn.Module, prototypes: torch.Tensor) -> torch.optim.Optimizer:
    groups = param_groups(student)
    if not (cfg.bug_proto_not_in_optimizer or cfg.bug_non_leaf_prototypes):
        groups.append({"params": [prototypes], "name": "prototypes", "weight_decay": 0.0,
                       "lr_scale": cfg.proto_lr_scale})
    # lr and weight decay are set by the schedule at every step
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.sgd_momentum)


def amp_setup(amp: str, device: torch.device) -> tuple[Any, Optional[torch.amp.GradScaler]]:
    """(a context-manager factory for the forward passes, a GradScaler for fp16 or None)."""
    if amp == "none":
        return contextlib.nullcontext, None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device: use amp=bf16 or amp=none on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


# ----------------------------------------------------------------------------------------------
# monitors and sinks
# ----------------------------------------------------------------------------------------------
def build_hub(cfg: Config, rank: int, exp_dir: Path, state: Optional[dict[str, Any]],
              student: torch.nn.Module, extra_monitors: Optional[list] = None
              ) -> tuple[MonitorHub, Optional[WandbSink]]:
    """The hub with the configured monitors; on rank 0 its sinks: W&B (unless disabled; the same
    run when resuming ``state``) and the local records. Returns (hub, the W&B sink or None)."""
    sinks, wandb_sink = build_sinks(
        rank, exp_dir=exp_dir, run=False if cfg.wandb_mode == "disabled" else None, wandb_options=dict(
            project=cfg.wandb_project, dir=str(exp_dir), mode=cfg.wandb_mode, config=cfg.to_dict(),
            run_id=(state or {}).get("wandb_run_id"), resume=state is not None, name=cfg.wandb_name or None,
            group=cfg.wandb_group or None, init_timeout=cfg.wandb_init_timeout))
    hub = MonitorHub(build_monitors(cfg.monitors) + list(extra_monitors or []), sinks=sinks,
                     log_every=cfg.log_every, stop_on_error=cfg.stop_on_error)
    if wandb_sink is not None and cfg.wandb_watch:  # W&B's own gradient/parameter hooks, for comparison
        hub.call_sink(wandb_sink, "watch", student, cfg.wandb_watch, cfg.wandb_watch_freq)  # isolated: opens the run
    return hub, wandb_sink
