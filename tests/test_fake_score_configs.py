"""The fake-score methods' configs: SiD's Optuna search space and the CIFAR-10 experiments of SiD, SiDA and
f-distill compose, hold the settings their comments name, and build their methods and optimisers (compose only, no
training)."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from fewstep.cli import CONF_DIR
from fewstep.distill import options

SMALL_EDM = ["model.model_channels=8", "model.num_blocks=1"]  # EDM's DDPM++ is 56M parameters
CIFAR10 = {"shape": [3, 32, 32], "num_classes": 10}
EXPERIMENTS = {"sid_cifar10": "SiD", "sida_cifar10": "SiDA", "fdistill_cifar10": "FDistill"}


def sweep_config(search: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_sid_optuna_optimises_what_its_benchmark_logs():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweeps extra: pip install -e '.[sweeps]'")
    from fewstep.callbacks.sampler_benchmark import tag_of

    cfg = sweep_config("sid_optuna")
    bench = cfg.callbacks.sampler_benchmark
    (sampler,), (nfe,) = bench.samplers, bench.nfe
    assert (sampler, nfe) == ("consistency", 1)  # one step of the generator
    row = {"sampler": sampler, "nfe_budget": nfe, "grid": bench.grid, "guidance": 0.0}
    assert cfg.hydra.sweeper.params.optimized_metric == f"benchmark/{bench.metric}/{tag_of(row)}"
    assert cfg.method._target_ == "fewstep.methods.SiD" and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.study_name == "sid" and cfg.hydra.sweeper.storage is None


def test_sid_optuna_searches_inside_what_sid_accepts():
    from fewstep.methods.sid import ALPHA_RANGE

    params = OmegaConf.load(CONF_DIR / "hparams_search" / "sid_optuna.yaml").hydra.sweeper.params
    assert set(params) == {"optimized_metric", "method.optimizer.lr", "method.optimizer_critic.lr", "method.alpha",
                           "method.sigma_init"}
    assert params["method.optimizer.lr"] == params["method.optimizer_critic.lr"] == "tag(log, interval(1e-5, 3e-4))"
    low, high = (float(v) for v in params["method.alpha"].removeprefix("interval(").removesuffix(")").split(","))
    assert ALPHA_RANGE[0] <= low < 1.2 < high <= ALPHA_RANGE[1]  # around the paper's default, never refused
    sigmas = [float(v) for v in params["method.sigma_init"].removeprefix("choice(").removesuffix(")").split(",")]
    assert sigmas == [1.5, 2.5, 4.0]


@pytest.mark.parametrize("experiment, cls", sorted(EXPERIMENTS.items()))
def test_the_cifar10_experiments_compose_on_edm_s_ddpmpp(compose_cfg, experiment, cls):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.method._target_ == f"fewstep.methods.{cls}"
    assert cfg.data._target_ == "fewstep.data.CIFAR10" and cfg.model._target_ == "fewstep.networks.edm.edm_denoiser"
    assert cfg.model.model_channels == 128 and list(cfg.model.channel_mult) == [2, 2, 2]  # DDPM++, as EDM's pickle
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "32-true"
    assert cfg.data.batch_size * 4 == 256  # the papers' batch on 4 devices
    assert cfg.sampler.name == "consistency"


@pytest.mark.parametrize("experiment", ["sid_cifar10", "sida_cifar10"])
def test_sid_s_experiments_hold_the_authors_settings(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    method = cfg.method
    assert method.alpha == (1.2 if experiment == "sid_cifar10" else 1.0) and method.sigma_init == 2.5
    assert list(method.dm_range) == [0.2, 1.0] and method.critic_steps == 1  # t ~ U[0, 0.8]; one fake-score update
    for key in ("optimizer", "optimizer_critic"):
        assert method[key].lr == 1e-5 and list(method[key].betas) == [0.0, 0.999] and method[key].eps == 1e-8
    images = 500e6 if experiment == "sid_cifar10" else 300e6
    assert cfg.trainer.max_steps == images / 256
    # EMA half-life 0.5 Mimg at 256 images per step
    assert math.isclose(cfg.callbacks.ema.decay, 0.5 ** (256 / 500_000), rel_tol=0, abs_tol=1e-8)
    if experiment == "sida_cifar10":
        assert method.gan_weight == pytest.approx(0.01 / 100) and method.critic_gan_weight == 1.0
        assert method.sid_ckpt is None


def test_fdistill_s_experiment_is_js_at_dmd2_s_settings(compose_cfg):
    cfg = compose_cfg("train", ["experiment=fdistill_cifar10"])
    dmd2 = compose_cfg("train", ["method=dmd2"]).method
    assert cfg.method.divergence == "js"
    for key in ("critic_steps", "gan_weight", "critic_gan_weight", "dm_range", "optimizer", "optimizer_critic"):
        assert cfg.method[key] == dmd2[key], key


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_the_cifar10_experiments_build_their_method_and_optimisers(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}", *SMALL_EDM, "model.augment_dim=0"])
    arguments = options(cfg)
    method = instantiate(arguments, net=cfg.model, data_shape=CIFAR10["shape"], num_classes=CIFAR10["num_classes"])
    assert isinstance(method, get_class(cfg.method._target_))
    generator, critic = method.configure_optimizers()
    for optimizer, key in ((generator, "optimizer"), (critic, "optimizer_critic")):
        group = optimizer.param_groups[0]
        assert group["lr"] == cfg.method[key].lr and list(group["betas"]) == list(cfg.method[key].betas)
    # the critic's optimiser holds the fake denoiser (and the GAN head where there is one), not the generator
    generator_ids = {id(p) for p in method.net.parameters()}
    assert not generator_ids & {id(p) for group in critic.param_groups for p in group["params"]}
