"""EDM2's training recipe as options of the EDM teacher: the inverse square-root learning-rate schedule
(``fewstep.lr_schedules.InverseSqrtLR``), the uncertainty-weighted loss (``method.loss_weighting=uncertainty``),
forced weight normalisation in training, and ``experiment=edm2_img64``.

EDM2_LR holds the values of EDM2's own ``learning_rate_schedule`` (NVlabs/edm2 at commit 4bf8162,
training/training_loop.py), run once outside this repository with its edm2-img64-s recipe:
``learning_rate_schedule(cur_nimg=step * 2048, batch_size=2048, ref_lr=0.0100, ref_batches=35000, rampup_Mimg=10)``
(its training loop sets the lr of step k, counted from 0, from cur_nimg = k x batch, before that step's update).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fewstep.checkpoints import load_method
from fewstep.constructors import build
from fewstep.errors import ConfigError
from fewstep.lr_schedules import InverseSqrtLR
from fewstep.methods import BatchNoise, EDMTeacher
from fewstep.networks.edm2 import MPConv
from fewstep.processes.gaussian import edm_loss_weight, edm_training_sigmas, uncertainty_weighted_loss
from fewstep.schema import UntrustedConfig, check_node
from fewstep.train import train

from helpers import SHAPE, TINY, UNET

# step -> EDM2's learning_rate_schedule at cur_nimg = step x 2048 (see the module docstring)
EDM2_LR = {
    0: 0.0, 1: 2.048e-06, 100: 0.00020480000000000002, 2441: 0.004999168, 4882: 0.009998336, 4883: 0.01, 10000: 0.01,
    34999: 0.01, 35000: 0.01, 35001: 0.009999857145918294, 70000: 0.0070710678118654745, 140000: 0.005,
    524287: 0.002583743978762962,
}
BATCH = 2048


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def optimizer(lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def lrs(scheduler: InverseSqrtLR, steps: int) -> list[float]:
    """The learning rate of each of the next ``steps`` optimiser steps, as a training loop sets them."""
    found = []
    for _ in range(steps):
        found.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return found


# ---------------------------------------------------------------------------------------------------------------
# The learning-rate schedule


def test_inverse_sqrt_schedule_follows_its_formula():
    base, ref, rampup = 0.05, 7, 2.5
    found = lrs(InverseSqrtLR(optimizer(base), ref_steps=ref, rampup_steps=rampup), 20)
    expected = [base * min(t / rampup, 1) / math.sqrt(max(t / ref, 1)) for t in range(20)]
    assert found == pytest.approx(expected, rel=1e-14, abs=0)
    assert found[0] == 0 and found[3] == base and found[7] == base and found[19] < base  # ramp, plateau, decay
    assert lrs(InverseSqrtLR(optimizer(base), ref_steps=0, rampup_steps=0), 3) == [base] * 3  # 0: neither


def test_inverse_sqrt_schedule_matches_edm2s_at_its_img64_recipe():
    scheduler = InverseSqrtLR(optimizer(0.0100), ref_steps=35000, rampup_steps=10e6 / BATCH)
    for step, lr in EDM2_LR.items():
        assert scheduler.lr(0.0100, step) == pytest.approx(lr, rel=1e-14, abs=0), step
    assert lrs(scheduler, 2) == [EDM2_LR[0], pytest.approx(EDM2_LR[1], rel=1e-14)]


def test_inverse_sqrt_schedule_resumes_from_its_state_dict():
    def fresh():
        return InverseSqrtLR(optimizer(0.02), ref_steps=5, rampup_steps=3)

    whole = lrs(fresh(), 12)
    first = fresh()
    head = lrs(first, 5)
    state = {"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}
    resumed = fresh()  # a new run: built from the config, then the checkpoint's states loaded, as Lightning does
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert head + lrs(resumed, 7) == whole
    assert state["scheduler"]["last_epoch"] == 5 and state["scheduler"]["ref_steps"] == 5.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(ref_steps=-1), "ref_steps=-1"), (dict(ref_steps=1, rampup_steps=math.inf), "rampup_steps=inf"),
])
def test_inverse_sqrt_schedule_refuses_bad_steps_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        InverseSqrtLR(optimizer(), **kwargs)
    one_line(error)


def test_a_file_may_name_the_schedule_exactly_with_numbers_only():
    node = {"_target_": "fewstep.lr_schedules.InverseSqrtLR", "_partial_": True, "ref_steps": 35000, "rampup_steps": 4882.8125}
    assert check_node(node, "scheduler", "method.scheduler") == node
    with pytest.raises(UntrustedConfig, match="not a number"):
        check_node({**node, "ref_steps": "35000"}, "scheduler", "method.scheduler")


# ---------------------------------------------------------------------------------------------------------------
# The loss


def tiny_edm2() -> dict:
    """An EDM2 network of a few thousand parameters (attention at 4 x 4)."""
    return {"_target_": "fewstep.networks.edm2.edm2_denoiser", "model_channels": 4, "channel_mult": [1, 2], "num_blocks": 1,
            "attn_resolutions": [4], "channels_per_head": 4, "logvar_channels": 4, "dropout": 0.0}


def randomized(method, seed: int = 1):
    """The method with every parameter moved off its initialisation (EDM2's gains start at 0, so D = c_skip x, u = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return method


def test_uncertainty_loss_is_edm2s_on_a_tiny_edm2_network():
    torch.manual_seed(0)
    method = randomized(EDMTeacher(net=tiny_edm2(), data_shape=[3, 8, 8], num_classes=3, conditional=True,
                                   loss_weighting="uncertainty", p_mean=-0.8, p_std=1.6)).eval()
    g = torch.Generator().manual_seed(2)
    x0, labels = 0.5 * torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 1])
    loss = method.loss(x0, labels, BatchNoise.for_step(0, 3, 5, "cpu"))

    # EDM2's EDM2Loss and its normalisation, written out: loss.sum() / batch over [batch, C, H, W]
    rng = BatchNoise.for_step(0, 3, 5, "cpu")  # the same draws: sigma first, then the noise
    sigma = rng.draw(lambda total, gen: edm_training_sigmas(total, -0.8, 1.6, gen, "cpu")).reshape(-1, 1, 1, 1)
    noise = rng.randn_like(x0)
    with torch.no_grad():
        denoised, logvar = method.net(x0 + sigma * noise, sigma.flatten(), labels, return_logvar=True)
    weight = (sigma**2 + 0.5**2) / (sigma * 0.5) ** 2
    expected = ((weight / logvar.exp()) * (denoised - x0) ** 2 + logvar).sum() / 5
    assert logvar.shape == (5, 1, 1, 1) and logvar.abs().min() > 1e-3  # the head is live, not its zero start
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    # not the EDM weighting: the learned u changes the value
    plain = (weight * (denoised - x0) ** 2).mean()
    assert not torch.isclose(loss.detach(), plain, rtol=1e-2)


def test_uncertainty_loss_is_least_where_exp_u_is_the_weighted_error():
    # minimised over u, lambda / e^u e + u is least at e^u = lambda e: each noise level's loss is levelled to 1 + u
    g = torch.Generator().manual_seed(0)
    denoised, x0 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    weight = edm_loss_weight(torch.tensor([0.1, 1.0, 10.0]), 0.5).view(-1, 1, 1, 1)
    error = (weight * (denoised - x0) ** 2).flatten(1).mean(1).view(-1, 1, 1, 1)
    best = uncertainty_weighted_loss(denoised, x0, weight, error.log())
    assert best.item() == pytest.approx(32 * (1 + error.log()).mean().item(), rel=1e-6)  # 32 coordinates each
    for shift in (-0.1, 0.1):
        assert uncertainty_weighted_loss(denoised, x0, weight, error.log() + shift) > best


# The default loss of HEAD's EDM teacher before these options (computed with the committed code at fixed seeds).
EDM_LOSS_BEFORE = {False: 3.1869843006134033, True: 2.24688720703125}


@pytest.mark.parametrize("conditional", [False, True])
def test_default_edm_loss_is_unchanged(conditional):
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, conditional=True) if conditional else {}
    method = EDMTeacher(net=UNET, data_shape=SHAPE, **kwargs)
    assert method.hparams.loss_weighting == "edm"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    x0 = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 3]) if conditional else None
    loss = method.loss(x0, labels, BatchNoise.for_step(0, 5, 4, "cpu")).item()
    assert loss == pytest.approx(EDM_LOSS_BEFORE[conditional], rel=1e-6, abs=0)  # equal here; other CPUs: rounding


def test_default_config_keeps_the_edm_weighting(compose_cfg):
    assert compose_cfg("train", []).method.loss_weighting == "edm"


def test_uncertainty_weighting_refuses_a_network_without_a_logvar_head():
    with pytest.raises(ConfigError, match=r"model=edm2_img64_s\|m\|l\|xl") as error:
        EDMTeacher(net=UNET, data_shape=SHAPE, loss_weighting="uncertainty")
    assert "UNet" in one_line(error)
    with pytest.raises(ConfigError, match="edm, uncertainty") as error:
        EDMTeacher(net=UNET, data_shape=SHAPE, loss_weighting="sum")
    one_line(error)


# ---------------------------------------------------------------------------------------------------------------
# The recipe: experiment=edm2_img64


def test_experiment_is_edm2s_img64_s_recipe(compose_cfg):
    cfg = compose_cfg("train", ["experiment=edm2_img64"])
    method, model = cfg.method, cfg.model
    assert model._target_ == "fewstep.networks.edm2.edm2_denoiser" and model.model_channels == 192 and model.dropout == 0
    assert (method.p_mean, method.p_std, method.sigma_data, method.loss_weighting) == (-0.8, 1.6, 0.5, "uncertainty")
    assert method.conditional and method.label_dropout == 0
    assert method.optimizer.lr == 0.0100 and list(method.optimizer.betas) == [0.9, 0.99] and method.optimizer.eps == 1e-8
    assert cfg.data.batch_size * 8 == BATCH and cfg.trainer.max_steps * BATCH == 1024 << 20
    assert list(cfg.callbacks.phema.sigma_rel) == [0.05, 0.10] and cfg.callbacks.phema.snapshot_every * BATCH == 8 << 20
    scheduler = build(method.scheduler)(build(method.optimizer)([torch.nn.Parameter(torch.zeros(1))]))
    assert isinstance(scheduler, InverseSqrtLR)
    for step, lr in EDM2_LR.items():
        assert scheduler.lr(method.optimizer.lr, step) == pytest.approx(lr, rel=1e-14, abs=0), step
    # the user's M: its own dropout stays; the schedule is changed at lr_schedule
    cfg = compose_cfg("train", ["experiment=edm2_img64", "model=edm2_img64_m", "lr_schedule.ref_steps=70000"])
    assert cfg.model.dropout == 0.1 and cfg.method.scheduler.ref_steps == 70000 and "start_factor" not in cfg.method.scheduler


class TrainingProbe(Callback):
    """Records, at every optimiser step, the lr and each MPConv weight's per-output-channel magnitude (root mean
    square) before the update (after the step's forward) and after it."""

    records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.records.append({"step": trainer.global_step, "start": magnitudes(pl_module)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.records[-1].update(lr=optimizer.param_groups[0]["lr"], before=magnitudes(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records[-1]["after"] = magnitudes(pl_module)


def magnitudes(method) -> torch.Tensor:
    """Every MPConv's weight's per-output-channel root mean square, concatenated."""
    weights = [m.weight.detach().flatten(1) for m in method.net.modules() if isinstance(m, MPConv)]
    return torch.cat([w.square().mean(1).sqrt() for w in weights])


def test_edm2_recipe_trains_from_scratch_with_unit_norm_weights_and_resumes(compose_cfg, tmp_path):
    tiny = ["model.model_channels=4", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]",
            "model.channels_per_head=4", "model.logvar_channels=4"]
    overrides = ["experiment=edm2_img64", "data=digits", *TINY[1:], *tiny, "trainer.limit_val_batches=0",
                 "method.optimizer.lr=0.05", "lr_schedule.ref_steps=1", "lr_schedule.rampup_steps=2",
                 "callbacks.phema.snapshot_every=1", "+callbacks.probe._target_=test_edm2_training.TrainingProbe",
                 "trainer.enable_checkpointing=true",
                 "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                 "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints",
                 "+callbacks.model_checkpoint.save_last=true", "+callbacks.model_checkpoint.save_top_k=0"]
    TrainingProbe.records.clear()
    train(compose_cfg("train", [*overrides, "trainer.max_steps=2"]))
    train(compose_cfg("train", [*overrides, "trainer.max_steps=4", "resume=auto"]))
    records = TrainingProbe.records
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    # the schedule, across the resume: 0.05 min(t / 2, 1) / sqrt(max(t, 1))
    assert [r["lr"] for r in records] == pytest.approx([0.0, 0.025, 0.05 / math.sqrt(2), 0.05 / math.sqrt(3)], rel=1e-12)
    # forced weight normalisation: a fresh network's weights are not unit-magnitude; every training forward leaves
    # them so (to 1 - eps / (eps + rms), EDM2's eps = 1e-4), the update moves them off, the next forward puts them back
    assert (records[0]["start"] - 1).abs().max() > 0.05
    for record in records:
        assert (record["before"] - 1).abs().max() < 1e-3, record["step"]
    assert (records[-1]["after"] - 1).abs().max() > 1e-2
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)["lr_schedulers"][0]
    assert (state["last_epoch"], state["ref_steps"], state["rampup_steps"]) == (4, 1.0, 2.0)
    method = load_method(last, weights="raw")  # the recorded scheduler node passes the file checks
    assert method.hparams.loss_weighting == "uncertainty" and method.hparams.scheduler["_target_"] == "fewstep.lr_schedules.InverseSqrtLR"
    assert len(list(tmp_path.rglob("phema/*"))) >= 2
