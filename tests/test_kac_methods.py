"""Kac samplers, velocity-space guidance, the Kac teacher and DistillKac endpoint distillation."""

import math
import warnings

import pytest
import torch

from fewstep.checkpoints import load_method, read_checkpoint
from fewstep.errors import CheckpointError, ConfigError
from fewstep.evaluate import training_config
from fewstep.generate import generate
from fewstep.methods import BatchNoise, KacEndpoint, KacTeacher
from fewstep.methods.kac_endpoint import check_stages
from fewstep.samplers import CountingDenoiser, guided_velocity, sample_kac
from fewstep.samplers.kac import KAC_SOLVERS, uniform_times
from fewstep.train import train

from helpers import MLP, TINY, kac_model

# trainer=debug drops the checkpoint callback; a staged run needs one per stage
CHECKPOINTS = [
    "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
]


# -- samplers ---------------------------------------------------------------------------------------


def linear_flow(x, t):
    """dx/dt = t x: x(0) = x(T) exp(-T^2 / 2) exactly."""
    return t.view(-1, 1) * x


@pytest.mark.parametrize("sampler, order", [("kac_euler", 1), ("kac_heun", 2), ("kac_ab2", 2)])
def test_kac_solvers_converge_at_their_order(sampler, order):
    x_T = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x_T * math.exp(-0.5)
    errors = [(sample_kac(linear_flow, x_T, sampler, nfe) - exact).abs().max().item() for nfe in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    # NFE doubles, so the step halves (Heun: nearly); the error shrinks by 2^order
    assert all(abs(rate - order) < 0.3 for rate in rates), (errors, rates)


@pytest.mark.parametrize("sampler, nfe, counted", [("kac_euler", 7, 7), ("kac_ab2", 7, 7), ("kac_heun", 7, 7), ("kac_heun", 8, 7)])
def test_kac_solvers_never_exceed_the_nfe_budget(sampler, nfe, counted):
    velocity = CountingDenoiser(linear_flow)
    sample_kac(velocity, torch.ones(3, 2), sampler, nfe)
    assert velocity.nfe == counted


@pytest.mark.parametrize("sampler", sorted(KAC_SOLVERS))
def test_a_time_grid_per_sample_equals_one_run_per_sample(sampler):
    # Endpoint distillation integrates each sample over its own interval: a [steps + 1, batch] grid.
    x = torch.randn(3, 2, dtype=torch.float64)
    starts = torch.tensor([1.0, 0.6, 0.25], dtype=torch.float64)
    grids = torch.stack([torch.linspace(s, s - 0.25, 5, dtype=torch.float64) for s in starts], dim=1)
    together = KAC_SOLVERS[sampler].fn(linear_flow, x, grids)
    for i in range(3):
        alone = KAC_SOLVERS[sampler].fn(linear_flow, x[i : i + 1], grids[:, i])
        torch.testing.assert_close(together[i : i + 1], alone)


def test_uniform_times_and_unknown_samplers():
    torch.testing.assert_close(uniform_times(4, 2.0), torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="sampler 'heun' cannot integrate a Kac flow: use one of kac_ab2"):
        sample_kac(linear_flow, torch.ones(1, 2), "heun", 4)
    with pytest.raises(ConfigError, match="nfe=0 is below the minimum"):
        sample_kac(linear_flow, torch.ones(1, 2), "kac_euler", 0)


def test_velocity_guidance():
    def velocity(x, t, class_labels):
        return x * (class_labels.view(-1, 1).to(x.dtype) + 1)

    x, t, labels = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 1])
    null = 3
    # w = 0 is the conditional velocity itself
    torch.testing.assert_close(guided_velocity(velocity, 0.0, labels, null)(x, t), velocity(x, t, labels))
    w = 1.5
    expected = (1 + w) * velocity(x, t, labels) - w * velocity(x, t, torch.full_like(labels, null))
    torch.testing.assert_close(guided_velocity(velocity, w, labels, null)(x, t), expected)
    with pytest.raises(ConfigError, match="guidance scale w=-1.0 is negative: use w >= 0"):
        guided_velocity(velocity, -1.0, labels, null)


# -- teacher and endpoint loss ----------------------------------------------------------------------


def test_kac_teacher_loss_and_samples_stay_in_the_cone():
    teacher = kac_model(a=4.0, c=2.0, T=0.5)
    x0 = torch.rand(64, 2) * 2 - 1
    loss = teacher.loss(x0, None, BatchNoise(64, "cpu", torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss) and loss > 0
    samples, labels, nfe = generate(teacher, 8, "kac_ab2", 5)
    assert samples.shape == (8, 2) and labels is None and nfe == 5
    # x_T lies in the cone [-c g(T), c g(T)]; the same seeds give the same prior
    prior = teacher.prior(_noise(range(8)))
    assert prior.abs().max() <= 2.0 * 0.5 + 1e-6
    torch.testing.assert_close(prior[3:], teacher.prior(_noise(range(3, 8))))


def _noise(seeds):
    from fewstep.samplers import SeededNoise

    return SeededNoise(seeds)


def test_endpoint_loss_against_its_closed_form():
    # teacher u = lam x, student u = mu x: N Euler sub-steps of size h = D / N give x (1 - h lam)^N,
    # the student x (1 - D mu); the loss is E |x_t|^2 ((1 - D mu) - (1 - h lam)^N)^2 over the sampled x_t.
    teacher = kac_model(a=9.0, c=3.0, denoise=[])
    student = kac_model(KacEndpoint, a=9.0, c=3.0, student_steps=4, teacher_steps=20)
    student.attach_teacher(teacher)
    lam, mu = 0.7, -0.4
    object.__setattr__(teacher, "velocity", lambda x, t, y=None: lam * x)
    object.__setattr__(student, "velocity", lambda x, t, y=None: mu * x)
    x0 = torch.randn(256, 2)
    loss = student.loss(x0, None, BatchNoise(256, "cpu", torch.Generator().manual_seed(1)))
    # the same draws of t_k and x_t as the loss made
    generator = torch.Generator().manual_seed(1)
    k = torch.randint(0, 4, (256,), generator=generator)
    x_t, _ = student.path.forward(x0, 1.0 - k.float() / 4, generator=generator)
    D, h = 1 / 4, 1 / 20
    expected = (x_t**2).mean() * ((1 - D * mu) - (1 - h * lam) ** 5) ** 2
    torch.testing.assert_close(loss, expected)


def test_endpoints_at_zero_take_the_teachers_denoising_jumps():
    # where the student interval ends at t = 0 the teacher's endpoint is its sample, which takes
    # the teacher's final jumps x <- x - t_d u(x, t_d); with u = lam x that is x (1 - h lam)^N prod (1 - t_d lam).
    teacher = kac_model(a=9.0, c=3.0, denoise=[0.2, 0.1])
    student = kac_model(KacEndpoint, a=9.0, c=3.0, student_steps=4, teacher_steps=20)
    assert student.denoise_times == () and teacher.denoise_times == (0.2, 0.1)
    student.attach_teacher(teacher)
    lam = 0.7
    object.__setattr__(teacher, "velocity", lambda x, t, y=None: lam * x)
    x = torch.randn(4, 2)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    factor = torch.full((4, 1), (1 - lam / 20) ** 5)
    factor[3] *= (1 - 0.2 * lam) * (1 - 0.1 * lam)
    torch.testing.assert_close(student.teacher_endpoint(x, t, None), x * factor)
    off = kac_model(KacEndpoint, a=9.0, c=3.0, student_steps=4, teacher_steps=20, teacher_denoise=False)
    off.attach_teacher(teacher)
    torch.testing.assert_close(off.teacher_endpoint(x, t, None), x * (1 - lam / 20) ** 5)
    # 100 -> 20 steps, the starts t = T - k D as the loss computes them: D = 0.05 is not a binary fraction, and
    # the last interval ends at 1.5e-8 in float32, which once hid the jumps from the first stage's students
    first = kac_model(KacEndpoint, a=9.0, c=3.0, student_steps=20, teacher_steps=100)
    first.attach_teacher(teacher)
    t = 1.0 - torch.arange(20).float() * (1.0 / 20)
    x = torch.randn(20, 2)
    factor = torch.full((20, 1), (1 - lam / 100) ** 5)
    factor[19] *= (1 - 0.2 * lam) * (1 - 0.1 * lam)
    torch.testing.assert_close(first.teacher_endpoint(x, t, None), x * factor)


def test_rollouts_replace_the_last_intervals_states_with_the_students_own():
    # with u = mu x, the student's M - 1 Euler steps of size D from the prior give x_T (1 - D mu)^(M - 1);
    # only samples drawn on the last interval (t = D) are replaced, so the mix of intervals is unchanged
    student = kac_model(KacEndpoint, a=9.0, c=3.0, student_steps=4, teacher_steps=20, rollout_share=0.5)
    mu = -0.4
    object.__setattr__(student, "velocity", lambda x, t, y=None: mu * x)
    t = 1.0 - torch.arange(4).repeat(64).float() / 4  # each start T - k D, k = 0..3
    x_t = torch.randn(256, 2)
    mixed = student.with_rollouts(x_t, t, None, BatchNoise(256, "cpu", torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(3)  # the same draws, in the same order
    rolled = (torch.rand(256, generator=generator) < 0.5) & (t == 0.25)
    prior = student.path.prior((256, 2), generator)
    torch.testing.assert_close(mixed, torch.where(rolled[:, None], prior * (1 - mu / 4) ** 3, x_t))
    assert 20 < int(rolled.sum()) < 44  # about half of the 64 on the last interval
    with pytest.raises(ConfigError, match="rollout_share=1.5"):
        kac_model(KacEndpoint, student_steps=4, teacher_steps=20, rollout_share=1.5)


def test_final_denoising_jumps_count_in_the_nfe_budget():
    teacher = kac_model()
    assert teacher.denoise_times == (0.2, 0.1, 0.05) and list(teacher.hparams.denoise) == [0.2, 0.1, 0.05]
    with torch.no_grad():  # a network that is not zero at the start
        for i, p in enumerate(teacher.net.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
    samples, _, nfe = generate(teacher, 4, "kac_euler", 10)
    assert nfe == 10
    plain, _, nfe = generate(teacher, 4, "kac_euler", 10, denoise=[])
    assert nfe == 10 and not torch.equal(samples, plain)
    # the jumps after 7 Euler steps, by hand
    seven, _, _ = generate(teacher, 4, "kac_euler", 7, denoise=[])
    x = seven
    with torch.no_grad():
        for t_d in (0.2, 0.1, 0.05):
            x = x - t_d * teacher.velocity(x, torch.full((4,), t_d))
    torch.testing.assert_close(samples, x)
    # at most half the budget: 3 NFE are 2 Euler steps and the first jump, 1 NFE one Euler step
    two, _, _ = generate(teacher, 4, "kac_euler", 2, denoise=[])
    with torch.no_grad():
        jumped = two - 0.2 * teacher.velocity(two, torch.full((4,), 0.2))
    torch.testing.assert_close(generate(teacher, 4, "kac_euler", 3)[0], jumped)
    torch.testing.assert_close(generate(teacher, 4, "kac_euler", 1)[0], generate(teacher, 4, "kac_euler", 1, denoise=[])[0])
    with pytest.raises(ConfigError, match=r"must lie in \(0, T"):
        kac_model(denoise=[0.0])
    with pytest.raises(ConfigError, match="take no options but denoise"):
        generate(teacher, 1, "kac_euler", 5, order=2)


def test_student_starts_from_its_teacher_and_stays_out_of_the_checkpoint():
    teacher = kac_model()
    student = kac_model(KacEndpoint, student_steps=2, teacher_steps=4)
    student.attach_teacher(teacher)
    for (name, a), b in zip(student.net.state_dict().items(), teacher.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(name.startswith("teacher") for name in student.state_dict())


def test_bad_stages_teachers_and_process_parameters():
    with pytest.raises(ConfigError, match="3 student steps do not divide the 20 teacher steps"):
        check_stages([100, 20, 3])
    with pytest.raises(ConfigError, match="all >= 1"):
        check_stages([4, 0])
    with pytest.raises(ConfigError, match="do not divide"):
        kac_model(KacEndpoint, student_steps=4, teacher_steps=4)
    student = kac_model(KacEndpoint, student_steps=1, teacher_steps=2, teacher_ckpt="t.ckpt")
    with pytest.raises(CheckpointError, match="teacher checkpoint 't.ckpt' does not match this student: its a is 4.0"):
        student.attach_teacher(kac_model(a=4.0))
    with pytest.raises(CheckpointError, match="its net is"):
        student.attach_teacher(KacTeacher(net={**MLP, "width": 8}, data_shape=[2]))
    from fewstep.methods import EDMTeacher

    with pytest.raises(CheckpointError, match="holds a EDMTeacher, not a Kac model"):
        student.attach_teacher(EDMTeacher(net=MLP, data_shape=[2]))
    for bad in ({"a": 0.0}, {"c": -1.0}, {"T": 0.0}):
        with pytest.raises(ConfigError, match="positive"):
            kac_model(**bad)


# -- the pipeline: python -m fewstep.train method=kac_endpoint ------------------------------------------


def test_kac_endpoint_pipeline_trains_its_teacher_then_every_stage(compose_cfg, tmp_path):
    overrides = [
        "method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}/outputs", "teacher.max_steps=3",
        "method.stages=[8,4,2,1]", "method.steps_per_stage=[2,3,1]", "debug=false", "callbacks.sample_grid.n=4", *CHECKPOINTS,
        # a schedule over each stage's own length: OneCycleLR's total_steps left to the fit
        "method.scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "~method.scheduler.start_factor",
        "~method.scheduler.total_iters", "+method.scheduler.max_lr=1e-3", "+method.scheduler.total_steps=null",
    ]
    cfg = compose_cfg("train", overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*val_check_interval.*")
        train(cfg)
    (teacher_ckpt,) = (tmp_path / "outputs" / "kac_teacher").glob("digits/*/checkpoints/last.ckpt")
    teacher = load_method(teacher_ckpt)
    assert isinstance(teacher, KacTeacher) and not isinstance(teacher, KacEndpoint)
    previous = teacher_ckpt
    for i, (steps, length) in enumerate(zip([4, 2, 1], [2, 3, 1]), start=1):
        ckpt = tmp_path / f"stage{i}_{steps}steps" / "checkpoints" / "last.ckpt"
        saved = read_checkpoint(ckpt)
        assert saved["global_step"] == length and saved["lr_schedulers"][0]["total_steps"] == length
        student = load_method(ckpt)
        assert isinstance(student, KacEndpoint) and student.hparams.student_steps == steps
        assert student.hparams.teacher_ckpt == str(previous)
        samples, _, nfe = generate(student, 4, "kac_euler", steps)
        assert samples.shape == (4, 1, 8, 8) and nfe == steps and torch.isfinite(samples).all()
        assert list((tmp_path / f"stage{i}_{steps}steps").rglob("samples/*.png"))
        assert training_config(str(ckpt), None).data._target_ == "fewstep.data.Digits"
        previous = ckpt

    # a second run finds the finished teacher instead of training another
    again = compose_cfg("train", [*overrides, "method.stages=[8,4]", "method.steps_per_stage=2", f"paths.output_dir={tmp_path}/again"])
    train(again)
    assert len(list((tmp_path / "outputs" / "kac_teacher").glob("digits/*"))) == 1
    student = load_method(tmp_path / "again" / "stage1_4steps" / "checkpoints" / "last.ckpt")
    assert student.hparams.teacher_ckpt == str(teacher_ckpt)


def test_stage_lengths_of_the_wrong_count_fail_before_the_teacher_is_trained(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}",
                                "method.stages=[8,4,2,1]", "method.steps_per_stage=[2,3]", "debug=false"])
    with pytest.raises(ConfigError, match=r"steps_per_stage=\[2, 3\]: .* per stage \(3 here"):
        train(cfg)
    assert not (tmp_path / "kac_teacher").exists()
    # trainer=debug gives every stage its few steps, whatever the lengths
    train(compose_cfg("train", ["method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}",
                                "method.stages=[4,2,1]", "method.steps_per_stage=[2,3,5]", "summary=false"]))


def test_kac_endpoint_under_trainer_debug_trains_a_debug_teacher_then_every_stage(compose_cfg, tmp_path):
    # trainer=debug writes no checkpoint of its own, yet each stage teaches the next from its checkpoint
    cfg = compose_cfg("train", ["method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}", "method.stages=[4,2,1]"])
    train(cfg)
    stages = sorted(tmp_path.glob("stage*_*steps/checkpoints/last.ckpt"))
    assert [p.parts[-3] for p in stages] == ["stage1_2steps", "stage2_1steps"]
    (teacher,) = tmp_path.glob("kac_teacher/*/*/checkpoints/last.ckpt")  # a debug teacher, of the debug run's steps
    assert read_checkpoint(teacher)["global_step"] == cfg.trainer.max_steps


def test_kac_endpoint_refuses_a_diffusion_teacher(compose_cfg, tmp_path):
    edm = compose_cfg("train", ["data=digits", *TINY, "trainer.enable_checkpointing=true",
                                "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                                f"+callbacks.model_checkpoint.dirpath={tmp_path}/edm", "+callbacks.model_checkpoint.save_last=true"])
    train(edm)
    cfg = compose_cfg("train", ["method=kac_endpoint", "data=digits", *TINY, *CHECKPOINTS, f"teacher.ckpt={tmp_path}/edm/last.ckpt"])
    with pytest.raises(CheckpointError, match="holds a EDMTeacher, not a Kac model"):
        train(cfg)
