"""Run configuration: a typed dataclass, YAML files, and ``key=value`` overrides.

Every key is checked: an unknown key is an error that names the closest valid one, and a value
of the wrong type is an error that names the expected type. Defaults are the published SDPN
configuration (SDPN.md); ``experiments/sdpn_tiny.yaml`` shrinks it for 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class Config:
    # -- data ---------------------------------------------------------------------------------
    data: str = "builtin"            # "builtin" (synthetic corpus) or a Kaldi dir (wav.scp, utt2spk)
    eval_data: str = "builtin"       # "builtin", a Kaldi dir with trials, or "" to skip evaluation
    data_cache: str = ".cache/protowatch"  # where the built-in corpus is generated (once)
    corpus_seed: int = 0
    num_train_speakers: int = 40     # built-in corpus size
    num_eval_speakers: int = 20
    utts_per_speaker: int = 8
    utt_seconds: float = 3.0
    max_frames: int = 400            # global crop (frames of 10 ms); local crops are half
    glb_num: int = 1                 # global crops per utterance (teacher)
    local_num: int = 4               # local crops per utterance (student)
    aug_prob: float = 0.6            # probability of additive noise per crop
    snr_min: float = 5.0
    snr_max: float = 20.0
    num_workers: int = 0             # DataLoader workers per process (0: load in the training process);
                                     # batches are the same for any value (pipeline/loader.py)
    prefetch_factor: int = 2         # batches each worker prepares ahead (torch's default); each
                                     # batch of 96 published crops is 37 MB of shared memory
    max_bad_files: int = 100         # unreadable files skipped (and counted) before the run stops:
                                     # a few broken files in a large corpus are normal, many mean a bad path
    noise_data: str = ""             # Kaldi dir or wav.scp of noise (MUSAN-like) for additive noise;
                                     # "": synthetic white/pink noise and corpus babble
    rir_data: str = ""               # Kaldi dir or wav.scp of room impulse responses (reverberation)
    # -- model --------------------------------------------------------------------------------
    channels: int = 1024             # ECAPA-TDNN width (3D-Speaker sdpn.yaml)
    scale: int = 8                   # Res2Net scale
    embed_dim: int = 512             # speaker embedding (backbone output)
    hidden_dim: int = 2048           # head MLP width
    head_layers: int = 3
    output_dim: int = 256            # head output = prototype dimension
    num_proto: int = 1024
    # -- loss ---------------------------------------------------------------------------------
    tau: float = 0.1                 # SNN temperature
    teacher_temp: float = 0.25       # sharpening temperature of the teacher targets
    sinkhorn_iters: int = 3
    memax_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    # -- optimisation -------------------------------------------------------------------------
    epochs: int = 150
    max_steps: int = 0               # optional cap on optimizer steps (0: no cap)
    batch_size: int = 96             # per process
    lr: float = 0.4                  # for a total batch of 256; scaled linearly with the batch
    min_lr: float = 1e-5
    warmup_epochs: int = 10
    weight_decay: float = 5e-5
    weight_decay_end: float = 5e-5
    sgd_momentum: float = 0.9
    clip_grad: float = 3.0           # per-parameter gradient-norm clipping (0: off)
    freeze_last_layer: int = 1       # epochs during which the prototype gradient is cancelled
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1; higher with small batches
    proto_lr_scale: float = 1.0      # prototype lr = lr * this (kept by the schedule)
    # -- run ----------------------------------------------------------------------------------
    seed: int = 0
    exp_dir: str = "runs/sdpn"       # checkpoints, W&B run directory, local records
    resume: bool = False             # continue from the newest good checkpoint in exp_dir (same W&B run, same step)
    trust_pickle: bool = False       # resume from a checkpoint that needs arbitrary pickle (code in it runs):
                                     # only for files from a trusted source (also: train --trust-pickle)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    threads: int = 0                 # torch CPU threads per process (0: torch's default)
    amp: str = "none"                # none | bf16 | fp16 (fp16 adds a GradScaler; bf16 needs none)
    log_every: int = 10              # steps between two log intervals (one host sync each)
    ckpt_every: int = 100            # steps between periodic checkpoints
    keep_checkpoints: int = 2        # checkpoint-<step>.pt files kept; checkpoint.pt links the newest
    on_nonfinite: str = "stop"       # stop | continue: at the log interval that sees NaN/Inf
                                     # prototypes (PROTO_NONFINITE) or loss; stop keeps the last
                                     # good checkpoint (nothing non-finite is ever written)
    eval_at_init: bool = True        # evaluate the untrained network too (eval/eer_at_init)
    eval_max_seconds: float = 0.0    # truncate evaluation utterances (0: full length)
    progress: bool = True            # progress bar with loss and steps/s
    wandb_mode: str = "offline"      # offline | online | disabled
    wandb_project: str = "protowatch"
    wandb_group: str = ""
    wandb_name: str = ""
    wandb_watch: str = ""            # also run wandb.watch(model, log=...): gradients | parameters | all
    wandb_watch_freq: int = 100
    wandb_init_timeout: float = 60.0  # seconds wandb.init may wait for the server in online mode;
                                     # then the run falls back to an offline run (wandb sync later)
    monitors: Any = "default"        # "default", "none", a list of names, or {name: {option: value}}
    stop_on_error: bool = False      # stop cleanly (checkpoint first) at an error finding
    # -- reproductions of the original SDPN bugs (experiments/bugs/) --------------------------
    bug_proto_not_in_optimizer: bool = False
    bug_proto_not_in_checkpoint: bool = False
    bug_no_grad_allreduce: bool = False
    bug_non_leaf_prototypes: bool = False
    # -- bugs of trainers in use today (experiments/bugs/, issue 11) ---------------------------
    bug_grad_allreduce_sum: bool = False       # 3D-Speaker's AllReduceSum: the prototype gradient summed over ranks
    bug_freeze_by_name: bool = False           # freeze_last_layer cancels names with 'last_layer': none match
    bug_teacher_shares_student: bool = False   # the teacher is the student's own tensors, not a copy
    bug_no_ema: bool = False                   # the EMA update of the teacher is never applied

    def validate(self) -> "Config":
        for key in ("num_proto", "output_dim", "embed_dim", "channels", "hidden_dim", "epochs",
                    "batch_size", "max_frames", "local_num", "glb_num", "log_every", "ckpt_every",
                    "head_layers", "scale"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}: set {key}=<a positive integer>")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 means no cap), got {self.max_steps}")
        if self.channels % self.scale:
            raise ConfigError(f"channels ({self.channels}) must be divisible by scale ({self.scale})")
        if self.max_frames < 4:
            raise ConfigError(f"max_frames must be >= 4, got {self.max_frames}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}: e.g. keep_checkpoints=2")
        if self.on_nonfinite not in ("stop", "continue"):
            raise ConfigError(f"on_nonfinite must be stop or continue, got {self.on_nonfinite!r}")
        if self.wandb_init_timeout <= 0:
            raise ConfigError(f"wandb_init_timeout must be > 0 seconds, got {self.wandb_init_timeout}")
        if self.wandb_watch not in ("", "gradients", "parameters", "all"):
            raise ConfigError(f"wandb_watch must be '', gradients, parameters or all, got {self.wandb_watch!r}")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.max_bad_files < 0:
            raise ConfigError(f"need num_workers >= 0, prefetch_factor >= 1 and max_bad_files >= 0, got "
                              f"{self.num_workers}, {self.prefetch_factor} and {self.max_bad_files}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}: e.g. amp=bf16 on a recent GPU")
        if self.snr_min > self.snr_max:
            raise ConfigError(f"snr_min ({self.snr_min}) must be <= snr_max ({self.snr_max})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; see pipeline/config.py for the valid keys"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check ``value`` against the type of ``key``; ints are accepted for floats."""
    expected = _HINTS[key]
    if expected is Any:
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key {key!r} in {where} must be {expected.__name__}, got {value!r} "
        f"({type(value).__name__}): e.g. {key}={_FIELDS[key].default!r}"
    )


def read_yaml_mapping(path: Path, what: str, missing_hint: str, shape: str,
                      error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """The mapping a YAML file holds, or ``error`` with a one-line message that names the file
    and the fix (missing file, invalid YAML, not a mapping). ``what``: "config file", "sweep
    file"; ``missing_hint`` follows "does not exist: "; ``shape`` names what the mapping holds."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist: {missing_hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must hold a mapping ({shape}), got {type(raw).__name__}")
    return raw


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    raw = read_yaml_mapping(path, "config file", "pass --config experiments/sdpn_tiny.yaml or another YAML file",
                            "key: value")
    base = raw.pop("base", None)
    if base is not None:
        merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
        merged.update(raw)
        return merged
    return raw


def config_file_values(path: str | Path) -> dict[str, Any]:
    """The keys a config file sets, its ``base`` file included (unchecked: ``load_config`` checks)."""
    return _read_yaml(Path(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``1e-3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value: write e.g. num_proto=512")
    key, _, raw = text.partition("=")
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> Config:
    """Build a Config from a YAML file (optional; may name a ``base`` file), then ``values``,
    then ``key=value`` overrides. Every key and type is checked."""
    cfg: dict[str, Any] = {}
    if path is not None:
        for k, v in _read_yaml(Path(path)).items():
            if k not in _FIELDS:
                raise _unknown_key(k, str(path))
            cfg[k] = _coerce(k, v, str(path))
    for k, v in (values or {}).items():
        if k not in _FIELDS:
            raise _unknown_key(k, "the given values")
        cfg[k] = _coerce(k, v, "the given values")
    for text in overrides:
        k, v = parse_override(text)
        if k not in _FIELDS:
            raise _unknown_key(k, "the command line")
        cfg[k] = _coerce(k, v, "the command line")
    return Config(**cfg).validate()
