"""fewstep.distill: a distillation run finds, reuses or trains its teacher and hands it to the student."""

import torch

from fewstep.checkpoints import load_method
from fewstep.generate import generate
from fewstep.methods import GDD, EDMTeacher
from fewstep.train import train

from conftest import TINY

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
