"""The training step and epoch, without Ray: what Ray Train workers run, and what the
benchmark times alone.

Generator loss (paper 2.4): L1(output, target) + sum_k w_k L1(head_k, target resized to head
k) (QS-Net's deep supervision) + adv_weight * adversarial term (least squares for QS-Net,
binary cross-entropy for the pix2pix cGAN) + ssim_weight * (1 - SSIM(output, target)) (MONAI's
SSIMLoss, the evaluation's window and constants; not in the paper, 0 there). The SSIM term is
averaged over the whole slice (valid windows), not over the brain as the evaluation's: the
background, near 1, dilutes it by each slice's brain fraction. Adam on the generator and the discriminator;
the learning rate is multiplied by ``plateau_factor`` when the validation loss plateaus, only
after epoch ``plateau_after_epoch``. With ``ema_decay`` > 0, an exponential moving average of
the generator's weights is what validation scores and what the best weights are taken from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from train.models import Model, plain_instance_norms, resize_like

__all__ = ["Losses", "Trainer", "freeze"]


@dataclass
class Losses:
    ds_weights: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)
    adv_weight: float = 0.01
    ssim_weight: float = 0.0


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _floats_only(average):
    """An EMA update that averages floating-point tensors and copies the others from the live model.

    torch's own EMA averages integer buffers too and truncates the result back to integers:
    Swin's ``relative_position_index`` came out with a third of its entries one off (82 -> 81),
    so every Swin block looked its position bias up at the wrong offset."""
    def update(ema: list, live: list, n_averaged) -> None:
        floats = [(e, c) for e, c in zip(ema, live) if e.is_floating_point() or e.is_complex()]
        if floats:
            average([e for e, _ in floats], [c for _, c in floats], n_averaged)
        for e, c in zip(ema, live):
            if not (e.is_floating_point() or e.is_complex()):
                e.copy_(c)
    return update


class Trainer:
    """Models, optimisers and the plateau schedule of one run; ``state_dict`` is a checkpoint."""

    def __init__(self, model: Model, lr: float = 2e-4, betas=(0.5, 0.999), losses: Losses | None = None,
                 lr_d: float | None = None,
                 plateau_factor: float = 0.9, plateau_after_epoch: int = 100, patience: int = 5,
                 device: torch.device | str = "cpu", freeze_encoder: bool = False, amp: bool = False,
                 channels_last: bool | None = None, ema_decay: float = 0.0, compile: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.losses = losses or Losses()
        if self.losses.ssim_weight:
            from monai.losses import SSIMLoss

            # the evaluation's SSIM (Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on the [0, 1] targets
            self._ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11,
                                       kernel_sigma=1.5, k1=0.01, k2=0.03)
        self.g = model.generator.to(self.device)
        self.d = model.discriminator.to(self.device) if model.discriminator is not None else None
        if freeze_encoder:
            if not hasattr(self.g, "encoder"):
                raise ValueError(f"{model.arch}: has no encoder to freeze")
            freeze(self.g.encoder)
        # frozen parameters get no optimiser state at all
        self.opt_g = torch.optim.Adam([p for p in self.g.parameters() if p.requires_grad], lr=lr, betas=tuple(betas))
        self.opt_d = (torch.optim.Adam(self.d.parameters(), lr=lr if lr_d is None else lr_d, betas=tuple(betas))
                      if self.d is not None else None)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt_g, mode="min", factor=plateau_factor,
                                                                patience=patience)
        self.plateau_after_epoch = plateau_after_epoch
        cuda = self.device.type == "cuda"
        self.amp = amp and cuda
        # amp, channels_last and compile are GPU options, ignored on a CPU. There, torch
        # 2.13.0's oneDNN crashes the process (double free / segfault) in the backward pass of
        # the residual blocks' strided 1x1 convolution in channels-last (Conv2d(8, 16, 1,
        # stride=2) at 64 x 64 is enough), and Inductor picks channels-last for convolutions.
        # Uncompiled, NCHW is faster on a GPU too: PyTorch runs nn.InstanceNorm2d through
        # batch-norm kernels with no NHWC path (H200, batch 64: 99 ms per step NHWC, 78 NCHW).
        # torch.compile of the generator's and discriminator's training calls, with instance
        # norms in plain ops so that Inductor fuses each with its activation and residual add
        # (the step is memory-bound at these channel counts: H200, batch 64, NHWC, 44 ms per
        # step against 75 eager); the modules themselves stay uncompiled, so state dicts, DDP
        # and the EMA see the same names as without it
        self.compile = bool(compile) and cuda
        # channels_last=None: NHWC when compiled (44 ms against 59 NCHW), else NCHW
        self.channels_last = (self.compile if channels_last is None else bool(channels_last)) and cuda
        if self.compile:
            self._prepare_compiled()
        if self.channels_last:
            self.g.to(memory_format=torch.channels_last)
            if self.d is not None:
                self.d.to(memory_format=torch.channels_last)
        # An exponential moving average of the generator's weights, validated and kept as the
        # best weights instead of the live ones: short, high-learning-rate runs (the demo's)
        # otherwise end on whichever noisy step the last batch left. Off (0) in the paper's recipe.
        self.ema_decay = float(ema_decay)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema = None
        if self.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            # the first update copies the generator as it is then, so weights loaded after this
            # (finetune's pretrained ones) are what the average starts from; lerp leaves frozen
            # weights bit-identical
            self.ema = AveragedModel(self.g, multi_avg_fn=_floats_only(get_ema_multi_avg_fn(self.ema_decay)),
                                     use_buffers=True)
        self.epoch = 0
        self._bind_calls()

    def _prepare_compiled(self) -> None:
        """Before the calls are compiled (a method of its own so that a CPU test runs it too)."""
        self.compile = True
        # Dynamo keeps at most 8 compiled versions of a function, then runs it eagerly without a
        # word: a stage's runs of other widths or architectures would pass that. One compiled
        # Trainer per process at a time (a stage trains its models in turn), so the last one's
        # graphs can go; a model of the same shape retraces and then finds its kernels in
        # Inductor's on-disk cache.
        torch._dynamo.reset()
        plain_instance_norms(self.g)
        if self.d is not None:
            plain_instance_norms(self.d)

    # the modules DDP wraps are swapped in through these
    def wrap(self, fn) -> None:
        self.g = fn(self.g)
        if self.d is not None:
            self.d = fn(self.d)
        self._bind_calls()

    def _bind_calls(self) -> None:
        ddp = hasattr(self.g, "module")
        # through DDP's wrapper (its gradient hooks), else the generator with its heads
        g_call = self.g if ddp else self.g.forward_heads
        self._g_call = torch.compile(g_call) if self.compile else g_call
        self._d_call = torch.compile(self.d) if self.compile and self.d is not None else self.d

    def _gen(self):
        g = self.g.module if hasattr(self.g, "module") else self.g
        return g

    def eval_generator(self) -> nn.Module:
        """The generator validation scores and the best weights come from (the average, if kept)."""
        return self.ema.module if self.ema is not None else self._gen()

    def generator_loss(self, x, y) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, its parts as detached 0-d tensors, output)."""
        out, heads = self._forward_heads(x)
        l1 = F.l1_loss(out, y)
        loss = l1
        parts = {"l1": l1.detach()}
        for k, h in enumerate(heads):
            w = self.losses.ds_weights[k] if k < len(self.losses.ds_weights) else 0.0
            lk = F.l1_loss(h, resize_like(y, h))
            loss = loss + w * lk
            parts[f"ds{k + 1}"] = lk.detach()
        if self.losses.ssim_weight:
            # in fp32 even under bf16 autocast: the window's variances are differences of squares
            # whose bf16 rounding (~2e-3 at 0.25) is larger than C2 (9e-4)
            with torch.autocast(self.device.type, enabled=False):
                s = self._ssim_loss(out.float(), y.float())
            loss = loss + self.losses.ssim_weight * s
            parts["ssim"] = s.detach()
        if self.d is not None:
            pred = self._d_call(torch.cat([x, out], 1))[-1]
            adv = self._adv(pred, True)
            loss = loss + self.losses.adv_weight * adv
            parts["adv"] = adv.detach()
        return loss, parts, out

    def _forward_heads(self, x):
        g = self.g
        if hasattr(g, "module"):  # DDP: call through the wrapper so gradients are synchronised
            out = self._g_call(x)
            heads = list(getattr(g.module.net, "heads", []))[: len(self.losses.ds_weights)] \
                if getattr(g.module, "deep_supervision", False) and g.training else []
            return out, heads
        return self._g_call(x)

    def _adv(self, pred, real: bool) -> torch.Tensor:
        tgt = torch.ones_like(pred) if real else torch.zeros_like(pred)
        if self.model.adversarial == "bce":
            return F.binary_cross_entropy_with_logits(pred, tgt)
        return F.mse_loss(pred, tgt)

    def train_step(self, batch: dict) -> dict:
        self.g.train()
        x = batch["input"].to(self.device, non_blocking=True)
        y = batch["target"].to(self.device, non_blocking=True)
        if self.channels_last:
            x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss_g, parts, out = self.generator_loss(x, y)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update_parameters(self._gen())
        parts["loss_g"] = loss_g.detach()
        if self.d is not None:
            self.d.train()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                real = self._d_call(torch.cat([x, y], 1))[-1]
                fake = self._d_call(torch.cat([x, out.detach()], 1))[-1]
                loss_d = 0.5 * (self._adv(real, True) + self._adv(fake, False))
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            parts["loss_d"] = loss_d.detach()
        # one device sync per step for all the parts: a float() each would stall a GPU's
        # queue between the forward and the backward pass
        values = torch.stack([v.float() for v in parts.values()]).tolist()
        return dict(zip(parts, values))

    @torch.no_grad()
    def val_sums(self, loader) -> tuple[float, int]:
        """(sum of per-slice L1, number of slices) over ``loader``, generator in eval mode."""
        g = self.eval_generator()
        g.eval()
        total, n = 0.0, 0
        for batch in loader:
            x = batch["input"].to(self.device)
            y = batch["target"].to(self.device)
            out = g(x)
            total += float(F.l1_loss(out.float(), y, reduction="none").mean(dim=(1, 2, 3)).sum())
            n += x.shape[0]
        return total, n

    def end_epoch(self, val_loss: float) -> None:
        self.epoch += 1
        if self.epoch > self.plateau_after_epoch and math.isfinite(val_loss):
            before = self.opt_g.param_groups[0]["lr"]
            self.sched.step(val_loss)
            after = self.opt_g.param_groups[0]["lr"]
            if self.opt_d is not None and after != before:
                # the discriminator keeps pace: against a critic still at full speed, a slowed
                # generator loses the adversarial game its drop was meant to settle
                for group in self.opt_d.param_groups:
                    group["lr"] *= after / before

    def state_dict(self) -> dict:
        g = self._gen()
        d = self.d.module if hasattr(self.d, "module") else self.d
        return {"arch": self.model.arch, "config": self.model.config, "epoch": self.epoch,
                "generator": g.state_dict(), "discriminator": d.state_dict() if d is not None else None,
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                "sched": self.sched.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "ema_n": int(self.ema.n_averaged) if self.ema is not None else 0}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        if state.get("arch") != self.model.arch or state.get("config") != self.model.config:
            raise ValueError(f"{source}: holds a {state.get('arch')} model {state.get('config')}, "
                             f"this run trains {self.model.arch} {self.model.config}")
        self._gen().load_state_dict(state["generator"])
        d = self.d.module if hasattr(self.d, "module") else self.d
        if d is not None and state.get("discriminator") is not None:
            d.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(int(state.get("ema_n", 1)))
        self.epoch = int(state["epoch"])
