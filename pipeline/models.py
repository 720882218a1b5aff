"""Networks for SDPN: ECAPA-TDNN backbone, MLP projection head, prototypes, EMA teacher.

The backbone follows ECAPA-TDNN (Desplanques et al., 2020) as implemented in 3D-Speaker
(itself adapted from SpeechBrain): TDNN(k=5) -> 3 SE-Res2Net blocks (k=3, dilations 2/3/4)
-> multi-layer feature aggregation -> attentive statistics pooling with global context
-> BN -> linear -> BN. The backbone output is the speaker embedding; the head maps it to
the L2-normalised space in which prototypes live.

Shapes: B batch, T frames, F mel bins, C channels, E embed_dim, D head output_dim,
K number of prototypes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ECAPA_TDNN",
    "SDPNHead",
    "SDPNModel",
    "build_model",
    "init_prototypes",
    "param_groups",
    "ema_update",
    "make_teacher",
    "count_parameters",
]


# --------------------------------------------------------------------------- backbone


class TDNNBlock(nn.Module):
    """Conv1d -> ReLU -> BatchNorm1d, 'same' length with reflect padding (as in 3D-Speaker)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(
            in_ch, out_ch, kernel_size, dilation=dilation, padding=pad, padding_mode="reflect"
        )
        self.act = nn.ReLU()
        self.norm = nn.BatchNorm1d(out_ch)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, T) -> (B, out_ch, T)
        return self.norm(self.act(self.conv(x)))


class Res2NetBlock(nn.Module):
    """Res2Net: split channels into `scale` groups; group i>0 gets TDNN(x_i + y_{i-1})."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(
            TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        chunks = torch.chunk(x, self.scale, dim=1)  # scale x (B, C/scale, T)
        ys = [chunks[0]]  # first split passes through untouched
        y = None
        for i, block in enumerate(self.blocks, start=1):
            y = block(chunks[i] if y is None else chunks[i] + y)
            ys.append(y)
        return torch.cat(ys, dim=1)


class SEBlock(nn.Module):
    """Squeeze-and-excitation over channels with a `se_channels` bottleneck."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, 1)
        self.conv2 = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        s = x.mean(dim=2, keepdim=True)  # (B, C, 1)
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(s))))
        return x * s


class SERes2NetBlock(nn.Module):
    """TDNN(1x1) -> Res2Net(k, d) -> TDNN(1x1) -> SE, plus a residual connection."""

    def __init__(
        self, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int
    ) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(channels, channels, 1, 1)
        self.res2net = Res2NetBlock(channels, scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(channels, channels, 1, 1)
        self.se = SEBlock(channels, se_channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        return self.se(self.tdnn2(self.res2net(self.tdnn1(x)))) + x


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling with global context.

    The attention sees each frame concatenated with the utterance mean and std, and returns
    the attention-weighted mean and std per channel.
    """

    def __init__(self, channels: int, attn_channels: int = 128, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        self.tdnn = TDNNBlock(channels * 3, attn_channels, 1, 1)
        self.conv = nn.Conv1d(attn_channels, channels, 1)

    def _stats(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        # x (B, C, T), w (B, C|1, T) weights summing to 1 over T -> mean, std (B, C)
        mean = (w * x).sum(dim=2)
        var = (w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
        return mean, var.clamp(min=self.eps).sqrt()  # clamp: sqrt'(0) is inf

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, 2C)
        T = x.shape[-1]
        uniform = x.new_full((1, 1, T), 1.0 / T)
        mean, std = self._stats(x, uniform)  # (B, C) each
        ctx = torch.cat(
            [x, mean.unsqueeze(2).expand(-1, -1, T), std.unsqueeze(2).expand(-1, -1, T)], dim=1
        )  # (B, 3C, T)
        attn = self.conv(torch.tanh(self.tdnn(ctx)))  # (B, C, T)
        attn = F.softmax(attn, dim=2)
        mean, std = self._stats(x, attn)
        return torch.cat([mean, std], dim=1)  # (B, 2C)


class ECAPA_TDNN(nn.Module):
    """ECAPA-TDNN speaker encoder: (B, T, in_dim) log-mel -> (B, embed_dim) embedding.

    `channels` is the width C of the TDNN / SE-Res2Net blocks; the aggregation layer has 3C
    channels (C=512 -> 1536 as in the paper; 3D-Speaker's SDPN recipe uses C=1024).
    `input_norm` applies per-utterance mean/variance normalisation over time to each mel bin
    (InstanceNorm1d without parameters), as 3D-Speaker's SSL ECAPA does on its input.
    `final_bn` adds the BatchNorm after the last linear layer of the paper (3D-Speaker's
    variant ends at the linear layer).
    """

    def __init__(
        self,
        in_dim: int = 80,
        channels: int = 512,
        embed_dim: int = 192,
        scale: int = 8,
        attn_channels: int = 128,
        se_channels: int = 128,
        input_norm: bool = True,
        final_bn: bool = True,
    ) -> None:
        super().__init__()
        for key, val in (("in_dim", in_dim), ("channels", channels), ("embed_dim", embed_dim),
                         ("scale", scale), ("attn_channels", attn_channels),
                         ("se_channels", se_channels)):
            if val < 1:
                raise ValueError(f"ECAPA_TDNN {key}={val} must be >= 1; pass a positive integer")
        if scale < 2:
            raise ValueError(f"ECAPA_TDNN scale={scale} must be >= 2 (Res2Net splits); use 4 or 8")
        if channels % scale != 0:
            raise ValueError(
                f"ECAPA_TDNN channels={channels} must be a multiple of scale={scale}; "
                f"use channels={scale * math.ceil(channels / scale)}"
            )
        self.in_dim = in_dim
        self.embed_dim = embed_dim
        self.input_norm = nn.InstanceNorm1d(in_dim) if input_norm else nn.Identity()
        self.layer0 = TDNNBlock(in_dim, channels, kernel_size=5, dilation=1)
        self.layer1 = SERes2NetBlock(channels, scale, se_channels, kernel_size=3, dilation=2)
        self.layer2 = SERes2NetBlock(channels, scale, se_channels, kernel_size=3, dilation=3)
        self.layer3 = SERes2NetBlock(channels, scale, se_channels, kernel_size=3, dilation=4)
        self.mfa = TDNNBlock(channels * 3, channels * 3, kernel_size=1, dilation=1)
        self.pool = AttentiveStatsPool(channels * 3, attn_channels)
        self.pool_bn = nn.BatchNorm1d(channels * 6)
        self.fc = nn.Linear(channels * 6, embed_dim)
        self.fc_bn = nn.BatchNorm1d(embed_dim) if final_bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, T, F) -> (B, E)
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"ECAPA_TDNN expects (batch, frames, {self.in_dim}) features, got "
                f"{tuple(x.shape)}; transpose (B, F, T) input with x.transpose(1, 2)"
            )
        x = self.input_norm(x.transpose(1, 2))  # (B, F, T)
        x0 = self.layer0(x)  # (B, C, T)
        x1 = self.layer1(x0)  # (B, C, T)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x = self.mfa(torch.cat([x1, x2, x3], dim=1))  # (B, 3C, T)
        x = self.pool_bn(self.pool(x))  # (B, 6C)
        return self.fc_bn(self.fc(x))  # (B, E)


# --------------------------------------------------------------------------- head + model


class SDPNHead(nn.Module):
    """MLP projection head: in -> hidden (-> hidden)* -> output, L2-normalised output.

    BatchNorm1d + GELU after every layer except the last (3D-Speaker's head with
    use_bn=True). `bottleneck_dim` is 3D-Speaker's name for the output size; when given it
    takes precedence over `output_dim`.
    """

    def __init__(
        self,
        in_dim: int,
        output_dim: int = 256,
        hidden_dim: int = 2048,
        bottleneck_dim: int | None = None,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        out = bottleneck_dim if bottleneck_dim is not None else output_dim
        for key, val in (("in_dim", in_dim), ("output_dim", out), ("hidden_dim", hidden_dim),
                         ("nlayers", nlayers)):
            if val < 1:
                raise ValueError(f"SDPNHead {key}={val} must be >= 1; pass a positive integer")
        self.output_dim = out
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, out)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, out))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # DINO / 3D-Speaker init: truncated normal std 0.02, zero bias.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, D), unit norm
        return F.normalize(self.mlp(x), dim=-1, p=2)


class SDPNModel(nn.Module):
    """Backbone followed by head. forward returns (embedding, z): embedding is the backbone
    output (the speaker embedding), z the normalised head output."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, T, F) -> (B, E), (B, D)
        emb = self.backbone(x)
        return emb, self.head(emb)


def build_model(
    in_dim: int = 80,
    channels: int = 512,
    embed_dim: int = 512,
    scale: int = 8,
    output_dim: int = 256,
    hidden_dim: int = 2048,
    nlayers: int = 3,
) -> SDPNModel:
    """ECAPA_TDNN(in_dim, channels, embed_dim, scale) + SDPNHead(embed_dim -> output_dim)."""
    backbone = ECAPA_TDNN(in_dim=in_dim, channels=channels, embed_dim=embed_dim, scale=scale)
    head = SDPNHead(embed_dim, output_dim=output_dim, hidden_dim=hidden_dim, nlayers=nlayers)
    return SDPNModel(backbone, head)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- prototypes


def init_prototypes(
    num_proto: int,
    output_dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A free leaf tensor (num_proto, output_dim), uniform in [-1/sqrt(output_dim),
    1/sqrt(output_dim)], requires_grad=True, as in the original SDPN (a plain tensor, not
    inside any module).

    The tensor is created on the generator's device, moved, and only then marked
    requires_grad, so it stays a leaf (unlike `Parameter(x).cuda()`, which returns a
    non-leaf). The caller must add it to an optimizer param group (weight decay 0), save it
    in checkpoints and all-reduce its gradient under DDP.
    """
    if num_proto < 1:
        raise ValueError(
            f"num_proto={num_proto} must be >= 1; set num_proto to a positive integer "
            f"(SDPN uses 1024)"
        )
    if output_dim < 1:
        raise ValueError(
            f"output_dim={output_dim} must be >= 1; set output_dim to the head's output size "
            f"(SDPN uses 256)"
        )
    bound = 1.0 / math.sqrt(output_dim)
    gen_device = generator.device if generator is not None else device
    with torch.no_grad():
        protos = torch.empty(num_proto, output_dim, device=gen_device)
        protos.uniform_(-bound, bound, generator=generator)
        protos = protos.to(device) if device is not None else protos
    return protos.requires_grad_(True)


# --------------------------------------------------------------------------- optimisation


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DDP / DataParallel, else the model itself."""
    return model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
    ) else model


def param_groups(model: nn.Module) -> list[dict]:
    """SDPN/DINO groups: weights get weight decay, biases and norm parameters (ndim <= 1)
    none. Returns [{"params": [...], "name": "regularized"}, {"params": [...],
    "name": "not_regularized", "weight_decay": 0.0}].

    Frozen parameters (requires_grad=False) are left out, as in DINO. The regularised group
    comes first: a schedule that writes weight decay into group 0 only stays correct.
    Prototypes are not in any module, so they are not here: add their own group.
    """
    regularized: list[Tensor] = []
    not_regularized: list[Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            not_regularized.append(p)
        else:
            regularized.append(p)
    return [
        {"params": regularized, "name": "regularized"},
        {"params": not_regularized, "name": "not_regularized", "weight_decay": 0.0},
    ]


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of `student` (DDP unwrapped) with every parameter frozen."""
    teacher = copy.deepcopy(_unwrap(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, momentum: float, copy_buffers: bool = True
) -> None:
    """Teacher <- EMA of student: params t = m*t + (1-m)*s; buffers copied from the student.

    DDP wrappers are unwrapped. Parameters are matched by name; a mismatch raises. Buffers
    (BatchNorm running stats) are copied when `copy_buffers` (the original SDPN instead lets
    the teacher, run in train mode, keep its own running stats: pass copy_buffers=False).
    No host-device sync.
    """
    t_mod, s_mod = _unwrap(teacher), _unwrap(student)
    t_params = dict(t_mod.named_parameters())
    s_params = dict(s_mod.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))[:5]
        raise ValueError(
            f"ema_update: teacher and student parameters differ (e.g. {missing}); build the "
            f"teacher with make_teacher(student)"
        )
    names = list(s_params)
    t_list = [t_params[n] for n in names]
    s_list = [s_params[n].detach().to(t_params[n].dtype) for n in names]
    m = float(momentum)
    torch._foreach_mul_(t_list, m)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - m)
    if copy_buffers:
        s_bufs = dict(s_mod.named_buffers())
        for name, buf in t_mod.named_buffers():
            if name in s_bufs:
                buf.copy_(s_bufs[name])
