"""fewstep.distill: a distillation run finds, reuses or trains its teacher and hands it to the student."""

import pytest
import torch

from fewstep.checkpoints import load_method
from fewstep.generate import generate
from fewstep.methods import GDD, EDMTeacher
from fewstep.train import train

from helpers import TINY

CHECKPOINTS = [
    "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
]


def test_gdd_run_trains_its_edm_teacher_then_the_generator(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [
        "method=gdd", "data=digits", *TINY, *CHECKPOINTS, f"paths.root={tmp_path}/outputs", "teacher.max_steps=3",
        "method.r1_interval=2", "callbacks.sample_grid.n=4",
    ])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_g"]))
    (teacher_ckpt,) = (tmp_path / "outputs" / "edm_teacher").glob("digits/*/checkpoints/last.ckpt")
    assert isinstance(load_method(teacher_ckpt), EDMTeacher)
    # the teacher's own grid used its sampler at 35 NFE; the generator's grid shows G(z) (1 NFE)
    assert list(teacher_ckpt.parent.parent.rglob("samples/step_*.png"))
    gdd = load_method(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(gdd, GDD) and gdd.hparams.teacher_ckpt == str(teacher_ckpt)
    samples, _, nfe = generate(gdd, 4, "euler", 1)
    assert nfe == 1 and samples.shape == (4, 1, 8, 8)
    assert list(tmp_path.glob("tensorboard/samples/step_*.png"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["images"]
    assert images == ["samples/euler_nfe1"], images


@pytest.mark.slow
def test_a_reused_teacher_is_named_in_one_line(tiny_checkpoint, compose_cfg, capsys):
    """A run without teacher.ckpt takes the finished teacher run of its data and model under paths.root, and says
    which one, when it was trained and how to pick another."""
    import pytest

    from fewstep.distill import find_teacher

    root, ckpt = tiny_checkpoint
    cfg = compose_cfg("train", ["method=gdd", "data=digits", "model=unet_tiny", f"paths.root={root / 'outputs'}"])
    found = find_teacher(cfg, fit=lambda *args, **kwargs: pytest.fail("trained a teacher although one was there"))
    assert found == ckpt.resolve()
    lines = [line for line in capsys.readouterr().out.splitlines() if "reusing" in line]
    assert len(lines) == 1 and lines[0].startswith(f"teacher: reusing {ckpt} (trained 20"), lines
    assert lines[0].endswith("; teacher.ckpt=PATH picks another)")
