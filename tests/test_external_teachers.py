"""Teachers from outside fewstep: an EDM network pickle and a diffusers folder sample, and every EDM-space
distillation method (progressive, consistency, DMD2, GDD, and DDIL over the first three) trains from them
with ``teacher.ckpt=PATH`` and samples from its own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.checkpoints import load_method
from fewstep.errors import CheckpointError, ConfigError
from fewstep.generate import generate
from fewstep.methods import EDMTeacher
from fewstep.train import train

from helpers import TINY, run_module

pytest.importorskip("diffusers")

FIXTURES = Path(__file__).parent / "fixtures" / "edm"
EDM_PICKLE = FIXTURES / "edm_ncsnpp.pkl"  # EDMPrecond over a tiny NCSN++, 3 x 8 x 8, unconditional, made by EDM's code
EDM2_PICKLE = FIXTURES.parent / "edm2" / "edm2_uncond.pkl"  # EDM2 Precond over a tiny magnitude-preserving UNet, 3 x 8 x 8, by EDM2's code
CHECKPOINTS = [
    "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
]


def image_folder(root: Path, n: int = 24, size: int = 8) -> Path:
    """``n`` random RGB images in two class folders: a data set of the teachers' image shape (3 x 8 x 8)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def diffusers_folder(root: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny random UNet2DModel (3 x 8 x 8) and its DDPM scheduler, saved as a pipeline folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}')
    return root


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return {"edm_pickle": EDM_PICKLE, "diffusers": diffusers_folder(tmp_path_factory.mktemp("ddpm")), "edm2_pickle": EDM2_PICKLE}


@pytest.mark.parametrize("kind", ["edm_pickle", "diffusers"])
def test_an_outside_teacher_loads_as_an_edm_teacher_whose_denoiser_is_the_networks(teachers, kind):
    teacher = load_method(teachers[kind])
    assert isinstance(teacher, EDMTeacher) and list(teacher.hparams.data_shape) == [3, 8, 8]
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0])
    assert torch.equal(teacher.denoiser(x, sigma), teacher.net(x, sigma))
    # a student built from the teacher's recorded network config has the same architecture, so its weights fit
    rebuilt = EDMTeacher(net=teacher.hparams.net, data_shape=[3, 8, 8]).eval()  # eval: EDM nets have dropout
    rebuilt.net.load_state_dict(teacher.net.state_dict())
    assert torch.allclose(rebuilt.denoiser(x, sigma), teacher.denoiser(x, sigma), atol=1e-6)
    samples, _, nfe = generate(teacher, 3, "heun", 5)
    assert nfe == 5 and samples.shape == (3, 3, 8, 8) and torch.isfinite(samples).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["edm_pickle", "diffusers"])
def test_fewstep_sample_takes_an_outside_teacher_as_it_takes_a_checkpoint(teachers, kind, tmp_path):
    result = run_module("fewstep.sample", f"ckpt={teachers[kind]}", "sampler=seeds3", "nfe=7", "n=4",
                        f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (4, 3, 8, 8)


METHODS = {
    "progressive": ["method=progressive", "summary=false", "method.start_steps=4", "method.end_steps=2", "method.steps_per_round=2"],
    "consistency": ["method=consistency", "method.teacher_steps=8", "method.sample_steps=2"],
    "dmd2": ["method=dmd2", "method.student_steps=2", "method.critic_steps=1"],
    "gdd": ["method=gdd"],  # the default discriminator: the teacher's own encoder
    "gdd_i": ["method=gdd", "method.freeze.level=1"],  # GDD-I: EDM's UNet blocks frozen (diffusers': refused)
    "ddil_progressive": ["method=progressive", "summary=false", "ddil=default", "method.start_steps=4", "method.end_steps=2",
                         "method.steps_per_round=2", "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2"],
    "ddil_consistency": ["method=consistency", "ddil=default", "method.teacher_steps=8", "method.sample_steps=2",
                         "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2"],
    "scd": ["method=scm", "method.mode=scd"],  # sCM from the teacher's PF-ODE
    "sid": ["method=sid"],
    "sida": ["method=sida"],
    "fdistill": ["method=fdistill", "method.critic_steps=1"],
    "ddil_dmd2": ["method=dmd2", "ddil=default", "method.critic_steps=1", "ddil.buffer.refresh_every=2",
                  "ddil.buffer.refresh_size=2"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["edm_pickle", "diffusers", "edm2_pickle"])
def test_every_distillation_method_trains_from_an_outside_teacher_and_samples(
    compose_cfg, tmp_path, teachers, kind, method
):
    data = image_folder(tmp_path / "images")
    overrides = [
        *METHODS[method], *TINY, "model=unet_small", "data=image_folder", f"data.root={data}", "data.resolution=8",
        "data.val_size=4", "data.batch_size=4", f"teacher.ckpt={teachers[kind]}", f"paths.root={tmp_path}/outputs",
        "callbacks.sample_grid.n=2", "trainer.max_steps=2", "trainer.val_check_interval=2", *CHECKPOINTS,
    ]
    if method == "gdd_i" and kind in ("diffusers", "edm2_pickle"):
        with pytest.raises(Exception, match="has no layers GDD-I can freeze") as error:  # hydra wraps the ConfigError
            train(compose_cfg("train", overrides))
        assert isinstance(error.value.__cause__, ConfigError)
        return
    metrics = train(compose_cfg("train", overrides))
    assert np.isfinite(metrics["val/loss"])
    checkpoints = sorted(tmp_path.rglob("checkpoints/last.ckpt"))  # progressive: one per round, the last round's last
    student = load_method(checkpoints[-1])
    teacher = load_method(teachers[kind])
    # the student runs the teacher's architecture (model=unet_small was replaced by it), not this run's model
    assert student.hparams.net == teacher.hparams.net and type(student.net) is type(teacher.net)
    sampler, nfe = ("euler", 1) if method.startswith("gdd") else ("consistency" if "consistency" in method else "euler", 2)
    if method in ("sid", "sida", "fdistill"):  # one-step generators
        sampler, nfe = "consistency", 1
    samples, _, used = generate(student, 2, sampler, nfe)
    assert used == nfe and samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()


def test_a_teacher_of_another_image_shape_is_refused_in_one_line(compose_cfg, tmp_path, teachers):
    cfg = compose_cfg("train", ["method=dmd2", *TINY, "data=digits", f"teacher.ckpt={EDM_PICKLE}",
                                f"paths.root={tmp_path}/outputs"])
    with pytest.raises(CheckpointError, match=r"makes images of shape \[3, 8, 8\] and this data set has \[1, 8, 8\]") as error:
        train(cfg)
    assert "\n" not in str(error.value)


def test_an_unconditional_student_of_a_conditional_teacher_is_refused_in_one_line(compose_cfg, tmp_path):
    data = image_folder(tmp_path / "images")
    cfg = compose_cfg("train", ["method=consistency", *TINY, "data=image_folder", f"data.root={data}",
                                "data.resolution=8", f"teacher.ckpt={FIXTURES / 'edm_adm_cond.pkl'}",
                                f"paths.root={tmp_path}/outputs"])
    with pytest.raises(CheckpointError, match="conditioned on 4 classes, the student on 0"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["edm_pickle", "diffusers"])
def test_fewstep_evaluate_scores_an_outside_teacher_against_reference_statistics_in_edms_format(teachers, kind, tmp_path):
    from fewstep.metrics.inception_weights import find_weights

    try:
        find_weights()
    except Exception:
        pytest.skip("FID weights absent: run 'python -m fewstep.metrics.weights'")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4096, 2048)) * 0.1
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))  # EDM's fid.py ref format
    result = run_module(
        "fewstep.evaluate", f"ckpt={teachers[kind]}", f"ref={tmp_path / 'ref.npz'}", "metric=fid", "n=6", "nfe=3",
        "repeats=2", "batch_size=6", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert row["nfe"] == 3 and len(row["values"]) == 2 and row["value"] == min(row["values"]) > 0
    assert row["seeds"] == [0, 6]  # two disjoint seed sets
