"""QS-Net and the three baselines of the paper (section 2.4), built from MONAI networks.

Every architecture maps ``(B, in_channels, H, W)`` (MRF T1 + T2, or T1w + T2w for the
generalisation study) to one contrast ``(B, 1, H, W)`` in the prepared [0, 1] scale:

- ``qsnet``: a 6-level U-Net with residual encoder blocks, instance normalisation and leaky
  ReLU, and deep supervision (a 1-channel head at each of the lower decoder resolutions), as
  MONAI's DynUNet builds it; a PatchGAN discriminator on (input, output) pairs, least-squares
  adversarial loss.
- ``resunet``: the same residual U-Net without deep supervision or discriminator (L1 only).
- ``cgan``: pix2pix: a plain U-Net generator (MONAI UNet, instance norm: pix2pix at batch 1)
  and a PatchGAN, binary cross-entropy adversarial loss.
- ``swin``: a Swin-transformer U-Net (MONAI SwinUNETR, 2-D), L1 only.

:func:`build` returns a :class:`Model` with ``generator``, optional ``discriminator`` and the
loss kind; the generator of QS-Net exposes ``encoder`` and ``decoder`` so that the finetune
stage can freeze exactly the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ARCHITECTURES", "Model", "build", "build_config", "depth_fits", "weight_layout", "QSNetGenerator", "InstanceNormOps", "plain_instance_norms"]

ARCHITECTURES = ("qsnet", "resunet", "cgan", "swin")
LEAKY = ("leakyrelu", {"negative_slope": 0.01})


class QSNetGenerator(nn.Module):
    """DynUNet (residual blocks, instance norm, leaky ReLU) with deep-supervision heads.

    ``forward`` returns the full-resolution output; ``forward_heads`` also returns the
    auxiliary 1-channel outputs at their own (lower) decoder resolutions, each to be compared
    with the target resized to it.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, filters=(32, 64, 128, 256, 512, 512),
                 deep_supervision: bool = True, heads: int = 4, norm_affine: bool = True):
        from monai.networks.nets import DynUNet

        super().__init__()
        levels = len(filters)
        strides = [1] + [2] * (levels - 1)
        self.deep_supervision = deep_supervision
        # nnU-Net's instance norm has a learnt scale and shift per channel; MONAI's "instance"
        # has none, so every block's output was forced to zero mean and unit variance. Site-B
        # SSIM, demo recipe, 3 seeds each, all six pairs better: T2-FLAIR 0.715 -> 0.753, SWI
        # 0.765 -> 0.785 (benchmarks/README.md, 2026-12-05)
        norm = ("instance", {"affine": True}) if norm_affine else "instance"
        self.net = DynUNet(2, in_channels, out_channels, [3] * levels, strides, strides[1:],
                           filters=list(filters), norm_name=norm, act_name=LEAKY,
                           deep_supervision=deep_supervision, deep_supr_num=heads if deep_supervision else 1,
                           res_block=True)

    @property
    def encoder(self) -> nn.ModuleList:
        n = self.net
        return nn.ModuleList([n.input_block, *n.downsamples, n.bottleneck])

    @property
    def decoder(self) -> nn.ModuleList:
        n = self.net
        parts = [*n.upsamples, n.output_block]
        if self.deep_supervision:
            parts.extend(n.deep_supervision_heads)
        return nn.ModuleList(parts)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = self.net
        out = n.output_block(n.skip_layers(x))
        # DynUNet's skip layers fill `heads` with each deep-supervision head's output
        heads = list(n.heads) if self.deep_supervision and self.training else []
        return out, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(x)[0]


class _Plain(nn.Module):
    """A generator without auxiliary heads, with the same interface."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward_heads(self, x):
        return self.net(x), []

    def forward(self, x):
        return self.net(x)


def depth_fits(size: int, depth: int) -> bool:
    """Whether a ``depth``-level U-Net trains on ``size`` x ``size`` images: it halves them
    ``depth - 1`` times, and its skip connections need every level whole (measured on the
    qsnet, resunet and cgan generators: 5 levels take 32, 48, 64, 80, 96 pixels, not 24 or 72)."""
    return size >= 2 ** depth and size % 2 ** (depth - 1) == 0


@dataclass
class Model:
    arch: str
    generator: nn.Module
    discriminator: nn.Module | None
    adversarial: str | None                      # "lsgan", "bce" or None
    config: dict = field(default_factory=dict)   # what build() needs to rebuild it

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.generator.parameters())


def _discriminator(in_channels: int, channels: int = 64, layers: int = 3) -> nn.Module:
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=2, num_layers_d=layers, channels=channels, in_channels=in_channels,
                              out_channels=1, norm="instance")


def build_config(arch: str, in_channels: int = 2, out_channels: int = 1, width: int = 32, depth: int = 6,
                 norm_affine: bool = True, **_) -> dict:
    """What :func:`build` records of a model (a card's ``build``), checked; ``width`` is the first
    level's channel count (paper-sized QS-Net: 32; demo: smaller); ``depth`` the U-Net's number of
    levels (the paper's: 6; Swin ignores it); ``norm_affine`` whether QS-Net's and Res-UNet's
    instance norms learn a scale and shift (False: models trained before they did, whose cards
    lack the key)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    w, depth = int(width), int(depth)
    if w < 4:
        raise ValueError(f"model width {w} is too small")
    if not 3 <= depth <= 8:
        raise ValueError(f"model depth {depth} is outside 3-8 levels")
    cfg = {"arch": arch, "in_channels": in_channels, "out_channels": out_channels, "width": w, "depth": depth}
    if arch in ("qsnet", "resunet"):
        cfg["norm_affine"] = bool(norm_affine)
    return cfg


def _swin_feature_size(width: int) -> int:
    return max(12, (width // 12) * 12 or 12)   # SwinUNETR needs a multiple of 12


def weight_layout(cfg: dict) -> dict:
    """What of a build config decides the names and shapes of the model's weights (two configs
    with the same layout load each other's weights): Swin has no depth, and its width is
    rounded to a feature size."""
    if cfg["arch"] == "swin":
        return {"feature_size": _swin_feature_size(cfg["width"])}
    return {k: cfg[k] for k in ("width", "depth", "norm_affine") if k in cfg}


def build(arch: str, in_channels: int = 2, out_channels: int = 1, width: int = 32, depth: int = 6,
          norm_affine: bool = True, **_) -> Model:
    """The model of :func:`build_config`'s arguments."""
    cfg = build_config(arch, in_channels, out_channels, width, depth, norm_affine)
    w, depth = cfg["width"], cfg["depth"]
    filters = [w * min(2 ** i, 16) for i in range(depth)]   # 6 levels: w, 2w, 4w, 8w, 16w, 16w
    if arch == "qsnet":
        return Model(arch, QSNetGenerator(in_channels, out_channels, filters, heads=min(4, depth - 2),
                                          norm_affine=norm_affine),
                     _discriminator(in_channels + out_channels, channels=2 * w), "lsgan", cfg)
    if arch == "resunet":
        return Model(arch, QSNetGenerator(in_channels, out_channels, filters, deep_supervision=False,
                                          norm_affine=norm_affine), None, None, cfg)
    if arch == "cgan":
        from monai.networks.nets import UNet

        # pix2pix's batch norm at its batch size 1, statistics of the image itself in training and
        # at inference alike, is instance norm (Isola et al. 2017, 3.3); running averages would
        # make inference another network, and its output depend on how slices are batched
        g = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=filters,
                 strides=[2] * (len(filters) - 1), num_res_units=0, norm=("instance", {"affine": True}),
                 act=LEAKY)
        return Model(arch, _Plain(g), _discriminator(in_channels + out_channels, channels=2 * w), "bce", cfg)
    from monai.networks.nets import SwinUNETR

    g = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=_swin_feature_size(w),
                  spatial_dims=2, use_v2=True)
    return Model(arch, _Plain(g), None, None, cfg)


class InstanceNormOps(nn.Module):
    """Instance normalisation (no running statistics) written in plain tensor ops.

    Same function as ``nn.InstanceNorm2d`` (biased variance, statistics in float32). It exists
    for ``torch.compile``: PyTorch runs ``nn.InstanceNorm2d`` through batch-norm kernels, which
    Inductor cannot fuse with the leaky ReLU and residual add around them and which have no
    channels-last path, so every norm cost layout copies and extra passes over the activations.
    """

    def __init__(self, eps: float = 1e-5, weight: nn.Parameter | None = None, bias: nn.Parameter | None = None):
        super().__init__()
        self.eps = float(eps)
        # the same parameter names as nn.InstanceNorm2d, so state dicts load either way
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) or unbatched (C, H, W), as nn.InstanceNorm2d takes
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(-2, -1), keepdim=True, correction=0)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)
        return y.to(x.dtype)


def plain_instance_norms(module: nn.Module) -> int:
    """Swap every ``nn.InstanceNorm2d`` without running statistics in ``module`` for
    :class:`InstanceNormOps`, in place (parameters shared, state dict unchanged); the count."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm2d) and not child.track_running_stats:
                setattr(parent, name, InstanceNormOps(child.eps, child.weight, child.bias))
                swapped += 1
    return swapped


def resize_like(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``target`` at the spatial size of ``like`` (area-averaged: a faithful low-resolution target)."""
    if target.shape[-2:] == like.shape[-2:]:
        return target
    return F.interpolate(target, size=like.shape[-2:], mode="area")
