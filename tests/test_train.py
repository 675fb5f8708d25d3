"""Models, the training step, the registry and the stage's checks (fast; Ray runs are in
test_train_ray.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest.params import ParamsError  # noqa: E402
from train import registry  # noqa: E402
from train.loop import Losses, Trainer  # noqa: E402
from train.models import ARCHITECTURES, build  # noqa: E402
from train.stages import train_config  # noqa: E402


def batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, size, size, generator=g)
    return {"input": x, "target": (0.3 * x[:, :1] + 0.7 * x[:, 1:]).clone()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_a_step(arch):
    torch.manual_seed(0)
    tr = Trainer(build(arch, width=8 if arch != "swin" else 12))
    before = [p.detach().clone() for p in tr.g.parameters()]
    parts = tr.train_step(batch())
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.g.parameters()))
    assert ("loss_d" in parts) == (arch in ("qsnet", "cgan"))
    tr.g.eval()
    assert tr.g(batch()["input"]).shape == (2, 1, 64, 64)


def test_qsnet_has_six_levels_and_four_supervised_heads():
    g = build("qsnet", width=8).generator.train()
    out, heads = g.forward_heads(torch.rand(1, 2, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert [h.shape[-1] for h in heads] == [32, 16, 8, 4]  # one per lower decoder resolution
    assert len(g.net.downsamples) == 4 and g.net.bottleneck is not None  # 6 levels with input and bottleneck


@pytest.mark.parametrize("k", range(4))
def test_each_deep_supervision_head_contributes_to_the_loss(k):
    """A head whose term is dropped gets no gradient; with its weight it does. Fails if a head
    is disconnected from the loss or from the network."""
    torch.manual_seed(0)
    model = build("qsnet", width=8)
    head = model.generator.net.deep_supervision_heads[k]
    for w, expect in ((1.0, True), (0.0, False)):
        weights = [0.5, 0.25, 0.125, 0.0625]
        weights[k] = w
        tr = Trainer(model, losses=Losses(tuple(weights), adv_weight=0.0))
        tr.g.train()
        tr.g.zero_grad()
        b = batch(size=64)
        loss, parts, _ = tr.generator_loss(b["input"], b["target"])
        assert f"ds{k + 1}" in parts
        loss.backward()
        grad = sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
        assert (grad > 0) == expect, (k, w, grad)


def test_the_ssim_term_is_the_evaluations_ssim_and_trains_the_generator():
    """(1 - SSIM) joins the loss only with a weight, as MONAI's SSIMLoss on the evaluation's
    window and constants: an independent SSIM of the same pair (the evaluation's, skimage's
    twin) gives the same number, and it has a gradient."""
    from train.evaluate.metrics import ssim_map

    torch.manual_seed(0)
    model = build("qsnet", width=8)
    b = batch(size=64)
    _, parts, _ = Trainer(model, losses=Losses(adv_weight=0.0)).generator_loss(b["input"], b["target"])
    assert "ssim" not in parts   # the paper's loss: no SSIM term unless asked for
    tr = Trainer(model, losses=Losses(ds_weights=(), adv_weight=0.0, ssim_weight=1.0))
    tr.g.eval()
    loss, parts, out = tr.generator_loss(b["input"], b["target"])
    x, y = out.detach().double().numpy(), b["target"].double().numpy()
    # MONAI's window is valid-only (no padding): compare the maps away from a 5-pixel border
    ref = np.mean([ssim_map(x[i, 0], y[i, 0], 1.0)[5:-5, 5:-5].mean() for i in range(len(x))])
    assert float(parts["ssim"]) == pytest.approx(1 - ref, abs=1e-4)
    assert float(loss.detach()) == pytest.approx(float(parts["l1"]) + float(parts["ssim"]), rel=1e-5)
    pred = torch.rand_like(b["target"], requires_grad=True)
    tr._ssim_loss(pred, b["target"]).backward()
    assert float(pred.grad.abs().sum()) > 0   # a gradient, not a reported number only


def test_the_ssim_term_stays_in_fp32_under_bf16_autocast():
    """On a GPU the generator loss runs under bf16 autocast: MONAI's window convolutions would
    run in bf16 too, and on smooth images (small local variances) the term came out 3x too
    large with a gradient pointing elsewhere. Here a smooth output and target, CPU autocast."""
    from train.evaluate.metrics import ssim_map

    tr = Trainer(build("qsnet", width=8), losses=Losses(ds_weights=(), adv_weight=0.0, ssim_weight=1.0))
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 64)
    smooth = 0.25 + 0.05 * torch.sin(6 * t)[None, None, :, None] * torch.cos(4 * t)[None, None, None, :]
    y = smooth + 0.01 * torch.randn(2, 1, 64, 64, generator=g)
    out = (smooth + 0.01 * torch.randn(2, 1, 64, 64, generator=g)).requires_grad_(True)
    tr._forward_heads = lambda x: (out, [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts, _ = tr.generator_loss(torch.zeros(2, 2, 64, 64), y)
    ref = np.mean([ssim_map(out.detach()[i, 0].double().numpy(), y[i, 0].double().numpy(), 1.0)[5:-5, 5:-5].mean()
                   for i in range(2)])
    assert float(parts["ssim"]) == pytest.approx(1 - ref, abs=1e-3)


def test_frozen_encoder_keeps_its_bytes_and_has_no_optimiser_state():
    torch.manual_seed(0)
    model = build("qsnet", width=8)
    enc = {k: v.clone() for k, v in model.generator.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in model.generator.decoder.state_dict().items()}
    tr = Trainer(model, freeze_encoder=True)
    for i in range(3):
        tr.train_step(batch(seed=i))
    after = model.generator.encoder.state_dict()
    assert all(torch.equal(enc[k], after[k]) for k in enc)
    assert any(not torch.equal(dec[k], v) for k, v in model.generator.decoder.state_dict().items())
    opt_params = {id(p) for grp in tr.opt_g.param_groups for p in grp["params"]}
    assert not opt_params & {id(p) for p in model.generator.encoder.parameters()}
    assert all(not p.requires_grad for p in model.generator.encoder.parameters())
    with pytest.raises(ValueError, match="no encoder"):
        Trainer(build("cgan", width=8), freeze_encoder=True)


def test_weight_average_follows_the_generator_and_keeps_a_frozen_encoder():
    torch.manual_seed(0)
    model = build("qsnet", width=8)
    enc = {k: v.clone() for k, v in model.generator.encoder.state_dict().items()}
    tr = Trainer(model, freeze_encoder=True, ema_decay=0.9, lr=1e-2)
    tr.train_step(batch(seed=0))  # the first update copies the generator
    avg = tr.eval_generator()
    assert avg is not model.generator
    assert all(torch.equal(a, b) for a, b in zip(avg.state_dict().values(), model.generator.state_dict().values()))
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    tr.train_step(batch(seed=1))
    live = model.generator.state_dict()
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * live[k])
    assert any(not torch.equal(v, live[k]) for k, v in avg.state_dict().items())
    # a frozen encoder stays bit-identical in the average too (finetune's byte check reads it)
    assert all(torch.equal(enc[k], avg.encoder.state_dict()[k]) for k in enc)
    # validation scores the average; a checkpoint carries it
    ref = Trainer(build("qsnet", width=8), freeze_encoder=True, ema_decay=0.9)
    ref.load_state_dict(tr.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.eval_generator().state_dict().values(),
                                                 avg.state_dict().values()))
    assert int(ref.ema.n_averaged) == 2
    b = batch(seed=2)
    avg.eval()
    with torch.no_grad():
        expect = float(torch.nn.functional.l1_loss(avg(b["input"]), b["target"]))
    total, n = tr.val_sums([b])
    assert total / n == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(build("qsnet", width=8), ema_decay=1.0)


def test_weight_average_copies_integer_buffers():
    """Swin's relative_position_index (int64) must stay what it is: torch's EMA averaged it and
    truncated the result, so the average looked its position bias up at wrong offsets."""
    torch.manual_seed(0)
    model = build("swin", width=12)
    index = {k: v.clone() for k, v in model.generator.state_dict().items() if not v.is_floating_point()}
    assert index  # the model has integer buffers, else this test proves nothing
    tr = Trainer(model, ema_decay=0.9, lr=1e-3)
    for seed in range(3):
        tr.train_step(batch(seed=seed))
    avg = tr.eval_generator().state_dict()
    assert all(torch.equal(avg[k], v) for k, v in index.items())


def test_checkpoint_of_another_architecture_is_refused():
    a = Trainer(build("qsnet", width=8))
    b = Trainer(build("resunet", width=8))
    with pytest.raises(ValueError, match="holds a qsnet model"):
        b.load_state_dict(a.state_dict(), source="x.pt")
    c = Trainer(build("qsnet", width=8))
    c.load_state_dict(a.state_dict())


def test_instance_norm_in_plain_ops_is_nn_instance_norm():
    from train.models import InstanceNormOps

    torch.manual_seed(0)
    for shape, ref in (((2, 5, 7, 9), torch.nn.InstanceNorm2d(5)), ((2, 5, 7, 9), torch.nn.InstanceNorm2d(5, affine=True)),
                       ((5, 7, 9), torch.nn.InstanceNorm2d(5, affine=True))):   # unbatched too
        x = (3 * torch.randn(shape) + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        if ref.affine:
            torch.nn.init.uniform_(ref.weight)
            torch.nn.init.uniform_(ref.bias)
        ops = InstanceNormOps(ref.eps, ref.weight, ref.bias)
        g = torch.randn(shape)
        a, b = ref(x), ops(x2)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        (a * g).sum().backward()
        (b * g).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qsnet", "resunet"])
def test_unet_instance_norms_learn_a_scale_and_shift(arch):
    """nnU-Net's instance norm is affine; MONAI's "instance" is not, and forced every block's
    output to zero mean and unit variance (site-B SSIM 0.02-0.04 lower on the demo)."""
    m = build(arch, width=8)
    norms = [mod for mod in m.generator.modules() if isinstance(mod, torch.nn.InstanceNorm2d)]
    assert norms and all(n.affine for n in norms)
    assert m.config["norm_affine"] is True
    # the old build, for cards written before: no norm parameters at all
    assert not any(n.affine for n in build(arch, width=8, norm_affine=False).generator.modules()
                   if isinstance(n, torch.nn.InstanceNorm2d))


def test_finetune_refuses_pretrained_weights_of_another_layout_only():
    from train.stages import pretrained_mismatch

    def card(arch, **kw):
        return {"build": {**build(arch, width=8).config, **kw}}

    assert pretrained_mismatch(card("qsnet"), "qsnet", 8, 6) is None
    assert pretrained_mismatch(card("qsnet"), "qsnet", 12, 6) == "pretrained with width 8 (params: 12): run pretrain again"
    assert pretrained_mismatch(card("resunet"), "resunet", 8, 5) == "pretrained with depth 6 (params: 5): run pretrain again"
    # a card from before the norms learnt a scale and shift
    old = card("qsnet")
    del old["build"]["norm_affine"]
    assert pretrained_mismatch(old, "qsnet", 8, 6) == "pretrained with norm_affine False (params: True): run pretrain again"
    # Swin has no depth, and widths 8 and 12 give it the same feature size: the same weights
    assert pretrained_mismatch(card("swin"), "swin", 12, 4) is None
    assert pretrained_mismatch(card("swin"), "swin", 24, 6) == ("pretrained with feature_size 12 (params: 24): "
                                                                "run pretrain again")
    assert pretrained_mismatch(card("cgan"), "cgan", 8, 5) == "pretrained with depth 6 (params: 5): run pretrain again"


def test_swapping_the_norms_keeps_the_state_dict_and_the_function():
    from train.models import plain_instance_norms

    torch.manual_seed(0)
    m = build("qsnet", width=8)
    with torch.no_grad():   # norms as trained, not at their initial identity
        for mod in m.generator.modules():
            if isinstance(mod, torch.nn.InstanceNorm2d) and mod.affine:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 2, 64, 64)
    keys = list(m.generator.state_dict())
    before = m.generator.forward_heads(x)
    d_before = m.discriminator(torch.cat([x, before[0]], 1))[-1]
    assert (plain_instance_norms(m.generator), plain_instance_norms(m.discriminator)) == (28, 3)
    assert not any(isinstance(mod, torch.nn.InstanceNorm2d) for mod in m.generator.modules())
    assert list(m.generator.state_dict()) == keys
    after = m.generator.forward_heads(x)
    for a, b in zip([before[0], *before[1]], [after[0], *after[1]]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.discriminator(torch.cat([x, after[0]], 1))[-1], d_before, atol=1e-5, rtol=1e-5)


def test_gpu_options_are_ignored_on_a_cpu():
    """torch 2.13.0's oneDNN crashes the process in channels-last backward passes of this model,
    and Inductor picks channels-last: on a CPU the step stays eager and NCHW."""
    tr = Trainer(build("qsnet", width=8), compile=True, channels_last=True, amp=True)
    assert (tr.compile, tr.channels_last, tr.amp) == (False, False, False)
    assert any(isinstance(mod, torch.nn.InstanceNorm2d) for mod in tr.g.modules())
    assert tr._g_call == tr.g.forward_heads and tr._d_call is tr.d


def test_compiled_step_traces_whole_and_matches_the_eager_step(monkeypatch):
    """The calls a GPU run compiles, traced by Dynamo and AOTAutograd on the CPU (backend
    aot_eager: no code generation): one graph each, no break, the heads come out, and the
    losses and weights follow the eager step's."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    ref = Trainer(build("qsnet", width=8, depth=4))
    torch.manual_seed(0)
    tr = Trainer(build("qsnet", width=8, depth=4))
    tr._prepare_compiled()   # what a GPU Trainer does when compiling; then its calls
    tr._bind_calls()
    b = batch(size=32)
    for _ in range(2):
        want, got = ref.train_step(b), tr.train_step(b)
        assert got.keys() == want.keys() and {"ds1", "ds2", "adv", "loss_d"} <= got.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the generator's call, the discriminator's with and without a gradient to its input
    assert counters["stats"]["unique_graphs"] == 3
    assert list(tr.state_dict()["generator"]) == list(ref.state_dict()["generator"])
    # Adam moves a weight by about lr a step whatever the size of its gradient, so a gradient
    # within rounding of zero may take the other sign in the traced graph (the instance norm
    # is plain ops there): such a weight ends up to 2 lr a step away. A few may; a head or a
    # layer the graph had lost would move none of its weights, or all of them differently.
    lr = ref.opt_g.param_groups[0]["lr"]
    for k, v in ref.state_dict()["generator"].items():
        diff = (tr.state_dict()["generator"][k] - v).abs()
        assert float(diff.max()) <= 2 * 2 * lr + 1e-5, k
        assert float((diff > 1e-4).float().mean()) <= 0.01, (k, int((diff > 1e-4).sum()), diff.numel())
    torch._dynamo.reset()


def test_compiled_step_through_ddp_keeps_the_heads(monkeypatch, tmp_path):
    """With several workers the generator is called through DDP's wrapper, compiled as a whole:
    the deep-supervision heads must still reach the loss."""
    import functools

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = Trainer(build("qsnet", width=8, depth=4))
        ref.wrap(DDP)
        torch.manual_seed(0)
        tr = Trainer(build("qsnet", width=8, depth=4))
        tr._prepare_compiled()   # what a GPU Trainer does when compiling
        tr.wrap(DDP)
        b = batch(size=32)
        for _ in range(2):
            want, got = ref.train_step(b), tr.train_step(b)
            assert got.keys() == want.keys() and {"ds1", "ds2"} <= got.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_plateau_schedule_only_after_its_epoch():
    tr = Trainer(build("resunet", width=8), plateau_after_epoch=3, patience=0, plateau_factor=0.9)
    for _ in range(3):
        tr.end_epoch(1.0)
    assert tr.opt_g.param_groups[0]["lr"] == pytest.approx(2e-4)
    for _ in range(3):
        tr.end_epoch(1.0)
    assert tr.opt_g.param_groups[0]["lr"] < 2e-4


def test_the_discriminator_learning_rate_drops_with_the_generators():
    tr = Trainer(build("qsnet", width=8, depth=3), lr=2e-4, lr_d=1e-4, plateau_after_epoch=0, patience=0,
                 plateau_factor=0.5)
    tr.end_epoch(1.0)
    tr.end_epoch(1.0)
    g, d = tr.opt_g.param_groups[0]["lr"], tr.opt_d.param_groups[0]["lr"]
    assert g < 2e-4 and d / 1e-4 == pytest.approx(g / 2e-4)
    # and a resumed run keeps the ratio it had
    tr2 = Trainer(build("qsnet", width=8, depth=3), lr=2e-4, lr_d=1e-4, plateau_after_epoch=0, patience=0,
                  plateau_factor=0.5)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.opt_d.param_groups[0]["lr"] == pytest.approx(d)


def test_cgan_normalises_each_image_alike_in_training_and_inference():
    """pix2pix at the paper's batch 1 normalises each image by its own statistics, in training and
    at inference (Isola et al. 2017, section 3.3): running averages of training batches at
    inference give another image than the one trained (and one that depends on the batch)."""
    torch.manual_seed(0)
    g = build("cgan", width=8, depth=3).generator
    x = torch.rand(3, 2, 32, 32) * 1000
    g.train()
    train_out = g(x)
    g.eval()
    with torch.no_grad():
        np.testing.assert_allclose(g(x).numpy(), train_out.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(g(x[:1]).numpy(), g(x)[:1].numpy(), atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in g.modules())


def test_registry_round_trip_and_bad_files(tmp_path):
    model = build("qsnet", width=8)
    card = registry.save(tmp_path / "m", model.generator, {"architecture": "qsnet", "build": model.config,
                                                           "contrast": "t1w", "inputs": "mrf"})
    g = registry.load(card)
    assert not g.training
    x = torch.rand(1, 2, 64, 64)
    model.generator.eval()
    assert torch.equal(g(x), model.generator(x))
    # a card whose build config is broken or names another architecture: refused, naming the card
    doc = registry.read_card(card)
    for build_cfg, why in (({**model.config, "arch": "unet9"}, "bad build config .unknown architecture 'unet9'"),
                           ({k: v for k, v in model.config.items() if k != "arch"}, "bad build config"),
                           ({**model.config, "arch": "resunet"}, "the card says 'qsnet', its build config 'resunet'")):
        with pytest.raises(registry.RegistryError, match=f"card.json: {why}"):
            registry.load({**doc, "build": build_cfg})
    # weights of another width under this card's build: why is in the message, not only that it failed
    wider = build("qsnet", width=12)
    other = registry.save(tmp_path / "w", wider.generator, {"architecture": "qsnet", "build": wider.config,
                                                            "contrast": "t1w", "inputs": "mrf"})
    with pytest.raises(registry.RegistryError, match=r"w/model.pt: cannot load the weights \(.*size mismatch"):
        registry.load({**registry.read_card(other), "build": model.config})
    (tmp_path / "m" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(registry.RegistryError, match="model.pt: sha256 differs"):
        registry.load(card)
    with pytest.raises(registry.RegistryError, match="card not found"):
        registry.load(tmp_path / "nothing")


@pytest.mark.parametrize("bad,msg", [({"archs": ["unet9"]}, "unknown architecture"),
                                     ({"contrasts": ["pd"]}, "unknown contrast"),
                                     ({"epochs": 0}, "train.epochs must be a positive integer"),
                                     ({"ema_decay": 1.0}, r"train.ema_decay must be in \[0, 1\)"),
                                     ({"num_workers": 64, "use_gpu": False}, "CPUs and no GPU"),
                                     ({"epochs": True}, "train.epochs must be a positive integer"),
                                     ({"learning_rate": 1e-3}, r"unknown train key\(s\) \['learning_rate'\]"),
                                     ({"lr": "1e-3"}, "train.lr must be a positive number, got '1e-3'"),
                                     ({"lr": float("nan")}, "train.lr must be a positive number"),
                                     ({"betas": [0.5]}, "train.betas must be two numbers"),
                                     ({"betas": [0.5, 1.0]}, "train.betas must be two numbers"),
                                     ({"adv_weight": "0.01"}, "train.adv_weight must be a number, 0 or more"),
                                     ({"ssim_weight": -1}, "train.ssim_weight must be a number, 0 or more"),
                                     ({"ds_weights": [0.5, -1]}, "train.ds_weights must be a list of numbers"),
                                     ({"plateau_factor": 0}, r"train.plateau_factor must be a number in \(0, 1\]"),
                                     ({"depth": 12}, "train.depth must be a whole number of U-Net levels"),
                                     ({"augment": "yes"}, "train.augment must be true, false or a mapping"),
                                     ({"compile": 1}, "train.compile must be true or false"),
                                     ({"use_gpu": "false"}, "train.use_gpu must be true, false or auto, got 'false'"),
                                     ({"max_failures": -2}, "train.max_failures must be a whole number, 0 or more"),
                                     ({"archs": "qsnet"}, "train.archs must be a non-empty list"),
                                     ({"extra_runs": [{"arch": "qsnet", "inputs": "ct"}]}, "bad train.extra_runs"),
                                     ({"extra_runs": [{"arch": "qsnet", "contrasts": ["pd"]}]}, "bad train.extra_runs"),
                                     ({"extra_runs": [{"arch": "qsnet", "stages": "scratch"}]}, "bad train.extra_runs")])
def test_bad_params_fail_in_one_line(bad, msg):
    with pytest.raises(ParamsError, match=msg):
        train_config({"train": bad})


def test_both_profiles_params_pass_the_checks():
    from ingest.params import load_params

    for profile in ("demo", "paper"):
        cfg = train_config(load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile=profile))
        assert cfg["use_gpu"] in (True, False, "auto")


def test_a_tuned_configuration_is_checked_like_params(tmp_path):
    from train.stages import read_tuned

    path = tmp_path / "best.yaml"
    path.write_text("searched: true\narch: qsnet\ntrain: {lr: 0.01}\nby_contrast: {t1w: {betas: [0.5, 'x']}}\n")
    with pytest.raises(ParamsError, match=r"best.yaml: by_contrast.t1w.betas must be two numbers"):
        read_tuned(path)
    path.write_text("searched: true\narch: qsnet\ntrain: {lr: 0.01, augment: false}\n")
    assert read_tuned(path)["train"] == {"lr": 0.01, "augment": False}


def test_split_runs_balances_cost_and_keeps_order():
    from train.distributed import split_runs

    runs = [{"arch": a, "name": f"{a}/{c}"} for a in ("qsnet", "resunet", "cgan", "swin") for c in ("t1w", "t2w")]
    groups = split_runs(runs, 2)
    assert sorted(r["name"] for g in groups for r in g) == sorted(r["name"] for r in runs)
    for g in groups:  # each group keeps the stage's order
        assert [runs.index(r) for r in g] == sorted(runs.index(r) for r in g)
    cost = [sum({"qsnet": 21, "resunet": 15, "cgan": 11, "swin": 45}[r["arch"]] for r in g) for g in groups]
    assert max(cost) - min(cost) <= 45
    assert split_runs(runs[:1], 2) == [runs[:1]]


def test_worker_loaders_validate_each_slice_once_and_shuffle_by_seed_and_epoch(tmp_path):
    from test_train_data import fake_prepared

    from train.distributed import _loaders

    tr = [str(p) for p in fake_prepared(tmp_path / "a", n=2, z=5, size=32, split="train", prefix="tr")]
    va = [str(p) for p in fake_prepared(tmp_path / "b", n=1, z=5, size=32, split="val", prefix="va")]
    run = {"contrast": "t1w", "inputs": "mrf", "train_stores": tr, "val_stores": va}
    cfg = {"seed": 3, "batch_size": 2}
    # two workers share the validation slices, none counted twice (a padded DistributedSampler repeats one)
    n_val = len(_loaders(run, cfg)[2].dataset)
    assert n_val % 2 == 1 and sum(len(_loaders(run, cfg, r, 2)[2].dataset) for r in range(2)) == n_val

    def order(epoch, seed=3):
        _, train, _ = _loaders(run, {**cfg, "seed": seed})
        train.sampler.set_epoch(epoch)
        return list(train.sampler)

    # a fresh process (a resumed run) at epoch 2 sees epoch 2's order, not epoch 0's
    assert order(2) == order(2) and order(2) != order(0) and order(2, seed=4) != order(2)


@pytest.mark.parametrize("text, why", [("profile: demo\nseed: abc\ndemo: {}\n", "seed 'abc': expected a whole number"),
                                       (b"profile: demo\n\xff\xfe\n", "cannot read the params file")])
def test_a_bad_params_file_is_one_line_naming_it(tmp_path, text, why):
    from ingest.params import load_params

    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ParamsError, match=f"params.yaml: {why}"):
        load_params(path)


@pytest.mark.parametrize("stage, section, change, why", [
    ("pretrain", "train", ("    lr: 1.0e-2 ", "    lr: fast "), "train.lr must be a positive number, got 'fast'"),
    ("prepare", "prepare", ("    image_size: 64", "    image_size: abc"), "prepare.image_size 'abc'"),
])
def test_cli_names_the_params_file_it_refuses(tmp_path, stage, section, change, why):
    """The one line names the file to edit, and nothing is read or started before it."""
    import subprocess

    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    assert change[0] in text
    params = tmp_path / "site-params.yaml"
    params.write_text(text.replace(change[0], change[1], 1))
    exe = Path(sys.executable).parent / "qsnet"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ingest"]
    args = {"pretrain": ["pretrain", "--params", str(params), "--stores", str(tmp_path / "none")],
            "prepare": ["prepare", str(tmp_path / "none"), str(tmp_path / "out"), "--params", str(params)]}[stage]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().startswith(f"qsnet {stage}: error: {params}: {why}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
