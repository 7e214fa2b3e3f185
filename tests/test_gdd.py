"""GDD (Zheng & Yang, arXiv 2405.20750): one-step generator, GAN losses, R1, discriminators, GDD-I freezing."""

import re
import warnings

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fewstep.checkpoints import load_method
from fewstep.cli import CONF_DIR
from fewstep.errors import CheckpointError, ConfigError, TrainingDiverged
from fewstep.generate import generate
from fewstep.methods.edm_teacher import EDMTeacher
from fewstep.methods.flow_teacher import FlowTeacher
from fewstep.methods.gan import discriminator_loss, generator_loss
from fewstep.methods.gdd import GDD
from fewstep.networks import UNet, edm_coefficients
from fewstep.networks.discriminators import (
    ConvDiscriminator,
    TeacherEncoderDiscriminator,
    TimmDiscriminator,
    build_discriminator,
)
from fewstep.networks.freezing import freeze, frozen_names
from fewstep.networks.preconditioning import shifted_edm_coefficients
from fewstep.samplers import SeededNoise

from helpers import SHAPE, randomize

UNET = {"_target_": "fewstep.networks.UNet", "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [1]}
MLP = {"_target_": "fewstep.networks.MLP", "width": 16, "depth": 2}
CONV = {"kind": "conv", "channels": [8, 16]}


def tiny_unet() -> UNet:
    return UNet(SHAPE, **{k: v for k, v in UNET.items() if k != "_target_"})


def teacher(net=UNET, **kwargs) -> EDMTeacher:
    return randomize(EDMTeacher(net=net, data_shape=SHAPE if net is UNET else [2], **kwargs))


def gdd(net=UNET, **kwargs) -> GDD:
    return GDD(net=net, data_shape=SHAPE if net is UNET else [2], **kwargs)


def quiet_trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, check_val_every_n_epoch=None,
        log_every_n_steps=1,
    )
    return L.Trainer(**{**options, **kwargs})


def loaders(n: int = 32, batch: int = 8):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, *SHAPE, generator=generator) * 2 - 1
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=batch, shuffle=True), DataLoader(data, batch_size=batch)


def fit(method, **trainer_kwargs):
    train, val = loaders()
    trainer = quiet_trainer(**trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|val_check_interval|LightningModule|ckpt).*")
        trainer.fit(method, train, val)
    return trainer


# -- GDD-I freezing -------------------------------------------------------------------------------------


LEVEL_PATTERNS = {
    1: r"(blocks\.\d+|mid\.\d+)\.conv[12]\.|^(downsample|upsample)\.\d+\.|(attns\.\d+|mid_attn)\.proj\.",
    2: r"(attns\.\d+|mid_attn)\.qkv\.",
    3: r"(blocks\.\d+|mid\.\d+)\.skip\.",
}


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_freeze_levels_freeze_exactly_the_named_layers(level):
    net = tiny_unet()
    names = [name for name, _ in net.named_parameters()]
    pattern = "|".join(LEVEL_PATTERNS[i] for i in range(1, level + 1)) or r"(?!)"
    expected = {name for name in names if re.search(pattern, name)}
    fraction = freeze(net, level)
    assert frozen_names(net) == expected
    counts = dict(net.named_parameters())
    assert fraction == pytest.approx(sum(counts[n].numel() for n in expected) / sum(p.numel() for p in net.parameters()))
    # norms, embeddings (the noise/label embedding and each block's affine emb), first and last layers stay trainable
    assert not any(re.search(r"norm|embed|\.emb\.|conv_in|conv_out", name) for name in frozen_names(net))
    if level:
        assert any(".skip." in n for n in expected) == (level == 3) and any(".qkv." in n for n in expected) == (level >= 2)


def test_freeze_levels_grow_and_resampling_can_stay_trainable():
    fractions = [freeze(tiny_unet(), level) for level in (0, 1, 2, 3)]
    assert fractions[0] == 0 and fractions[0] < fractions[1] < fractions[2] < fractions[3] < 1
    net = tiny_unet()
    assert freeze(net, 1, resampling=False) < fractions[1]
    assert not any(n.startswith(("downsample", "upsample")) for n in frozen_names(net))


def test_gdd_i_levels_on_edms_cifar10_ddpmpp_freeze_what_the_paper_reports():
    # GDD-I reports about 84 / 86 / 90 % of the parameters frozen at levels 1 / 2 / 3 on EDM's CIFAR-10 DDPM++
    from omegaconf import OmegaConf

    from fewstep.cli import CONF_DIR
    from fewstep.networks.edm import UNetBlock, edm_denoiser

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "edm_ddpmpp_cifar.yaml"))
    config.pop("_target_")
    fractions = []
    for level in (1, 2, 3):
        with torch.device("meta"):  # the full 56M-parameter network, without allocating it
            net = edm_denoiser([3, 32, 32], 0, **config)
        fractions.append(freeze(net, level))
        # what stays trainable: norms, embeddings, each block's affine, the first and last convolutions
        assert all(p.requires_grad for name, p in net.named_parameters() if re.search(r"norm|map_|affine|_conv\.", name))
        assert all(not block.conv0.weight.requires_grad for block in net.modules() if isinstance(block, UNetBlock))
    assert fractions == sorted(fractions)
    assert fractions == pytest.approx([0.84, 0.86, 0.90], abs=0.02)


def test_freeze_ratio_freezes_whole_eligible_layers_up_to_the_target():
    level3 = tiny_unet()
    eligible = frozen_names(level3) if freeze(level3, 3) else set()
    for ratio in (0.3, 0.6):
        net = tiny_unet()
        reached = freeze(net, ratio=ratio)
        assert reached >= ratio and frozen_names(net) <= eligible
        # whole layers: a weight is frozen with its bias
        assert {n.rsplit(".", 1)[0] for n in frozen_names(net) if n.endswith("weight")} == {
            n.rsplit(".", 1)[0] for n in frozen_names(net) if n.endswith("bias")
        }
    assert freeze(tiny_unet(), ratio=0.0) == 0.0


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": "half"}, {"level": 4}, {"level": 1, "ratio": 0.5}])
def test_bad_freeze_settings_are_one_line_config_errors(bad):
    net = tiny_unet()
    with pytest.raises(ConfigError, match="freeze") as error:
        freeze(net, **bad)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="freeze"):
        gdd(freeze=bad, discriminator=CONV)


def test_freezing_an_mlp_is_refused():
    with pytest.raises(ConfigError, match="no layers GDD-I can freeze"):
        gdd(net=MLP, freeze={"level": 1})


# -- the generator and its preconditioning --------------------------------------------------------------


def test_shifted_preconditioning_is_the_identity_at_eps_and_edm_without_shift():
    method = gdd(discriminator=CONV)
    randomize(method.net)
    x = torch.randn(3, *SHAPE)
    eps = method.hparams.eps
    assert torch.equal(method.denoiser(x, eps), x)  # c_skip(eps) = 1 and c_out(eps) = 0 exactly
    sigma = torch.tensor([0.002, 0.5, 80.0])
    for ours, edm in zip(shifted_edm_coefficients(sigma, 0.5, 0.0), edm_coefficients(sigma, 0.5)):
        assert torch.equal(ours, edm)


def test_generator_at_initialisation_is_the_teachers_one_step_denoise():
    t = teacher()
    method = gdd(discriminator=CONV)
    method.attach_teacher(t)
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((4,), 80.0)
    with torch.no_grad():
        ours, theirs = method.one_step(z), t.denoiser(80 * z, sigma)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
        s_skip, s_out, _, _ = shifted_edm_coefficients(sigma, 0.5, 2e-3)
        f = t.net(c_in.view(-1, 1, 1, 1) * 80 * z, c_noise)
    # Same network, same c_in and c_noise: G - D_teacher = dc_skip 80 z + dc_out F, with dc_out = -eps sd / sqrt(80^2 + sd^2)
    # ~ -1.25e-5 and dc_skip ~ 2e-9. Tolerance 2e-6: a few float32 ulps of outputs of size ~1 (both sides rounded).
    shift = (s_skip - c_skip).view(-1, 1, 1, 1) * 80 * z + (s_out - c_out).view(-1, 1, 1, 1) * f
    assert shift.abs().max() > 1e-5  # the shift is visible at this tolerance ...
    torch.testing.assert_close(ours - theirs, shift, rtol=0, atol=2e-6)  # ... and is the whole difference
    # without the shift (eps -> 0) it is the teacher's one-step denoise bit for bit
    exact = gdd(discriminator=CONV, eps=1e-12)
    exact.attach_teacher(t)
    with torch.no_grad():
        assert torch.equal(exact.one_step(z), theirs)


def test_one_step_sampling_uses_the_seeds_noise():
    method = gdd(discriminator=CONV)
    method.attach_teacher(teacher())
    samples, labels, nfe = generate(method, 4, "euler", 1, seed=10)
    assert nfe == 1 and labels is None and samples.shape == (4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(samples, method.one_step(SeededNoise(range(10, 14)).randn(SHAPE)))
    # sample i depends on seed i only, whatever the batch
    torch.testing.assert_close(generate(method, 2, "heun", 1, seed=12, batch_size=1)[0], samples[2:])
    # more NFE runs the diffusion sampler on the generator's network (a diagnostic), and counts its calls
    assert generate(method, 2, "euler", 3)[2] == 3
    with pytest.raises(ConfigError, match="Kac flow"):
        generate(method, 2, "kac_euler", 1)


# -- GAN losses and R1 ----------------------------------------------------------------------------------


class ToyDiscriminator(nn.Module):
    """D(x) = a * mean(x): a known linear function with one parameter."""

    def __init__(self, a: float = 0.5):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def initialize(self, teacher_net=None):
        pass

    def forward(self, x, class_labels=None):
        return self.a * x.flatten(1).mean(1)


@pytest.mark.parametrize("a", [-1.0, 0.5, 2.0])
def test_gan_losses_against_their_formulas_on_a_linear_discriminator(a):
    method = gdd(discriminator=CONV)
    method.discriminator = ToyDiscriminator(a)
    real, fake = torch.ones(4, *SHAPE), -torch.ones(4, *SHAPE)  # D(real) = a, D(fake) = -a
    out = method.discriminator_losses(real, fake, None, apply_r1=False)
    softplus = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    torch.testing.assert_close(out["loss"], 2 * softplus(-a))  # softplus(D(G z)) + softplus(-D(x))
    torch.testing.assert_close(out["d_real"], torch.tensor(a))
    torch.testing.assert_close(generator_loss(method.discriminator(fake)), softplus(a))  # softplus(-D(G z))
    # hinge: relu(1 + D(G z)) + relu(1 - D(x)); generator -D(G z)
    torch.testing.assert_close(discriminator_loss(torch.tensor([a]), torch.tensor([-a]), "hinge"), torch.tensor(2 * max(0.0, 1 - a)))
    torch.testing.assert_close(generator_loss(torch.tensor([-a]), "hinge"), torch.tensor(a))
    # a discriminator step widens the margin D(real) - D(fake) = 2a
    optimizer = torch.optim.Adam(method.discriminator.parameters(), lr=1e-2, betas=(0.0, 0.99))
    out["loss"].backward()
    optimizer.step()
    assert method.discriminator.a.item() > a


def test_generator_loss_pushes_fakes_towards_higher_logits():
    logits = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    generator_loss(logits).backward()
    torch.testing.assert_close(logits.grad, -torch.sigmoid(-logits.detach()) / 3)
    assert (logits.grad < 0).all()


def test_r1_is_gamma_over_two_times_the_squared_input_gradient_scaled_by_the_interval():
    method = gdd(discriminator=CONV, r1_gamma=0.1, r1_interval=4)
    method.discriminator = ToyDiscriminator(2.0)  # grad_x D = a / d per pixel: |grad|^2 = a^2 / d
    real = torch.randn(5, *SHAPE)
    out = method.discriminator_losses(real, -real, None, apply_r1=True)
    d = real[0].numel()
    torch.testing.assert_close(out["r1"], torch.tensor(0.1 / 2 * 4.0 / d))
    torch.testing.assert_close(out["loss"], out["loss_d"] + 4 * out["r1"])
    assert [method.r1_due(step) for step in range(6)] == [True, False, False, False, True, False]
    assert not gdd(discriminator=CONV, r1_gamma=0.0).r1_due(0)


def test_a_nan_loss_names_the_fix():
    method = gdd(discriminator=CONV)
    with pytest.raises(TrainingDiverged, match=r"generator loss is nan .* lower method.optimizer_g.lr") as error:
        method.check_finite(torch.tensor(float("nan")), "generator")
    assert "\n" not in str(error.value)


# -- discriminators -------------------------------------------------------------------------------------


@pytest.fixture
def timm_weights(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "test_resnet.pt"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


def test_discriminator_kinds_build_and_give_one_logit_per_sample(timm_weights):
    t = teacher()
    x = torch.rand(3, *SHAPE) * 2 - 1
    discs = {
        "teacher_encoder": build_discriminator({"kind": "teacher_encoder", "sigma": 0.5}, net=UNET, data_shape=SHAPE),
        "timm": build_discriminator({"kind": "timm", "name": "test_resnet", "weights": str(timm_weights)}, net=UNET, data_shape=SHAPE),
        "conv": build_discriminator(CONV, net=UNET, data_shape=SHAPE),
        "target": build_discriminator({"_target_": "fewstep.networks.discriminators.ConvDiscriminator"}, net=UNET, data_shape=SHAPE),
    }
    for name, disc in discs.items():
        disc.initialize(t.net)
        assert disc(x).shape == (3,), name
    assert isinstance(discs["target"], ConvDiscriminator)
    # the timm backbone holds the file's weights, frozen and in eval mode even when the module trains
    saved = torch.load(timm_weights)
    timm_disc = discs["timm"].train()
    for key, value in timm_disc.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not timm_disc.backbone.training and not any(p.requires_grad for p in timm_disc.backbone.parameters())
    # class-conditional: a projection term per class
    conditional = ConvDiscriminator(SHAPE, num_classes=3, channels=[8])
    labels = torch.tensor([0, 1, 2])
    assert conditional(x, labels).shape == (3,) and not torch.equal(conditional(x, labels), conditional(x, labels.flip(0)))


def test_teacher_encoder_is_frozen_but_passes_gradients_to_its_input():
    t = teacher()
    disc = TeacherEncoderDiscriminator(UNET, SHAPE)
    assert not any(p.requires_grad for p in disc.backbone.parameters())  # frozen from construction (checkpoint rebuilds)
    disc.initialize(t.net)
    torch.testing.assert_close(disc.backbone.conv_in.weight, t.net.conv_in.weight)
    assert not hasattr(disc.backbone, "up")  # the decoder is dropped
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    x = torch.randn(2, *SHAPE, requires_grad=True)
    disc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    # vector data: the MLP teacher's blocks
    mlp = TeacherEncoderDiscriminator(MLP, [2])
    mlp.initialize(teacher(MLP).net)
    assert mlp(torch.randn(5, 2)).shape == (5,)


def test_discriminator_errors_are_one_line(tmp_path):
    cases = [
        (lambda: TimmDiscriminator("test_resnet", SHAPE, weights=None), "pass method.discriminator.weights=PATH"),
        (lambda: TimmDiscriminator("test_resnet", SHAPE, weights=str(tmp_path / "nope.pt")).initialize(), "not found"),
        (lambda: build_discriminator({"kind": "vgg"}, net=UNET, data_shape=SHAPE), "unknown discriminator kind 'vgg'"),
        (lambda: build_discriminator({"kind": "conv", "sigma": 1}, net=UNET, data_shape=SHAPE), "takes no option 'sigma'"),
        (lambda: ConvDiscriminator([2]), "reads images"),
    ]
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    cases.append((lambda: TimmDiscriminator("test_resnet", SHAPE, weights=str(tmp_path / "other.pt")).initialize(), "does not fit"))
    for make, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            make()
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="use method.discriminator.kind=teacher_encoder"):
        TimmDiscriminator("test_resnet", SHAPE, weights=None)


# -- teachers and bad settings --------------------------------------------------------------------------


def test_teacher_of_another_method_or_architecture_is_refused():
    method = gdd(discriminator=CONV, teacher_ckpt="t.ckpt")
    with pytest.raises(CheckpointError, match="teacher checkpoint 't.ckpt' does not match this student: its net is"):
        method.attach_teacher(EDMTeacher(net={**UNET, "model_channels": 4}, data_shape=SHAPE))
    with pytest.raises(CheckpointError, match="its sigma_data is 1.0"):
        method.attach_teacher(EDMTeacher(net=UNET, data_shape=SHAPE, sigma_data=1.0))
    with pytest.raises(CheckpointError, match="teacher checkpoint 'flow.ckpt' holds a FlowTeacher, not an EDM-space denoiser"):
        method.attach_teacher(FlowTeacher(net=UNET, data_shape=SHAPE), path="flow.ckpt")
    with pytest.raises(ConfigError, match="unknown GAN loss 'wgan'"):
        gdd(discriminator=CONV, loss="wgan")
    with pytest.raises(ConfigError, match="gdd has no teacher"):
        fit(gdd(discriminator=CONV), max_steps=1)


# -- Lightning: training, validation, checkpoints ------------------------------------------------------


def test_short_fit_freezes_counts_r1_and_logs(monkeypatch):
    torch.manual_seed(0)
    method = gdd(freeze={"level": 2}, r1_interval=2, discriminator={"kind": "teacher_encoder", "head_channels": 8})
    method.attach_teacher(teacher())
    before = {name: p.detach().clone() for name, p in method.net.named_parameters()}
    encoder = {name: p.detach().clone() for name, p in method.discriminator.backbone.named_parameters()}
    frozen = frozen_names(method.net)
    assert frozen and method.frozen_fraction == pytest.approx(
        sum(before[n].numel() for n in frozen) / sum(p.numel() for p in before.values())
    )
    r1_steps, original = [], method.discriminator_losses

    def spy(x_real, fake, labels, apply_r1):
        if apply_r1:
            r1_steps.append(method.global_step)
        return original(x_real, fake, labels, apply_r1)

    monkeypatch.setattr(method, "discriminator_losses", spy)
    trainer = fit(method, max_steps=5, val_check_interval=5)
    assert trainer.global_step == 5  # one global step per batch: the discriminator step is not counted
    assert r1_steps == [0, 2, 4]
    for name, p in method.net.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name  # bit-identical
        else:
            assert not torch.equal(p, before[name]), name
    for name, p in method.discriminator.backbone.named_parameters():
        assert torch.equal(p, encoder[name]), name  # the teacher encoder stays frozen
    metrics = trainer.callback_metrics
    for key in ("train/loss_g", "train/loss_d", "train/r1", "train/d_real", "train/d_fake", "val/loss", "val/d_real"):
        assert torch.isfinite(metrics[key]), key
    assert float(metrics["train/frozen_fraction"]) == pytest.approx(method.frozen_fraction)


def test_checkpoint_round_trip_and_resume_with_ema(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    torch.manual_seed(0)
    method = gdd(freeze={"level": 1}, discriminator=CONV)
    method.attach_teacher(teacher(), path="teacher.ckpt")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(method, max_steps=2, val_check_interval=2, enable_checkpointing=True,
        callbacks=[checkpoints, EMAWeightAveraging(decay=0.9)])
    path = tmp_path / "last.ckpt"
    loaded = load_method(path)
    assert isinstance(loaded, GDD) and loaded.frozen_fraction == pytest.approx(method.frozen_fraction)
    # after fit the module holds the EMA weights, as the checkpoint's state_dict does
    for (name, a), b in zip(method.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(generate(loaded, 3, "euler", 1)[0], generate(method.eval(), 3, "euler", 1)[0])
    stored = torch.load(path, weights_only=False)
    assert len(stored["optimizer_states"]) == 2 and stored["global_step"] == 2
    assert stored["hyper_parameters"]["teacher_ckpt"] == "teacher.ckpt"
    # resume: no teacher needed, both optimisers restored, the step count goes on
    resumed = GDD(**stored["hyper_parameters"])
    train, val = loaders()
    again = quiet_trainer(max_steps=3, val_check_interval=3, callbacks=[EMAWeightAveraging(decay=0.9)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|val_check_interval|LightningModule).*")
        again.fit(resumed, train, val, ckpt_path=path, weights_only=False)
    assert again.global_step == 3
    for optimizer in again.optimizers:  # Adam's step counts went on from the checkpoint's 2 (G and D alike)
        assert {float(state["step"]) for state in optimizer.state.values()} == {3.0}


def test_class_conditional_generator_and_projection_discriminator():
    torch.manual_seed(0)
    method = gdd(conditional=True, num_classes=3, discriminator={"kind": "teacher_encoder", "head_channels": 8})
    method.attach_teacher(teacher(conditional=True, num_classes=3))
    assert method.discriminator.heads[0].embed.num_embeddings == 4  # 3 classes + the null label
    samples, labels, nfe = generate(method, 6, "euler", 1, guidance=1.0)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and samples.shape == (6, *SHAPE) and nfe == 1
    assert fit(method, max_steps=2, val_check_interval=2).global_step == 2


# -- config ---------------------------------------------------------------------------------------------


def test_gdd_config_composes_and_builds(compose_cfg):
    cfg = compose_cfg("train", ["method=gdd", "model=unet_tiny", "data=digits", "method._target_=fewstep.methods.gdd.GDD"])
    assert cfg.teacher.method == "edm_teacher" and cfg.teacher.ckpt is None and cfg.sampler.name == "euler"
    assert cfg.method.discriminator.kind == "teacher_encoder" and list(cfg.method.optimizer_g.betas) == [0, 0.99]
    built = instantiate(cfg.method, net=cfg.model, data_shape=[1, 8, 8], num_classes=10)
    assert isinstance(built, GDD) and built.hparams.sigma_max == 80 and built.frozen_fraction == 0
    level = compose_cfg("train", ["method=gdd", "model=unet_tiny", "data=digits", "method._target_=fewstep.methods.gdd.GDD",
                                  "method.freeze.level=3"])
    assert instantiate(level.method, net=level.model, data_shape=[1, 8, 8], num_classes=10).frozen_fraction > 0.5
    for sweep, key in (("gdd_freeze", "method.freeze.level"), ("gdd_freeze_ratio", "method.freeze.ratio")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            swept = compose("train", overrides=[f"hparams_search={sweep}"], return_hydra_config=True)
        assert swept.method._target_.endswith("GDD") and key in swept.hydra.sweeper.params, sweep
