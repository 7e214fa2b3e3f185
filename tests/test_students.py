"""Progressive, consistency (LCM) and DMD2 distillation, and DDIL's training states on top of each."""

import pytest
import torch

from fewstep.checkpoints import load_method
from fewstep.data import Gaussian
from fewstep.data.rollout import RolloutBuffer, RolloutStates, check_weights, draw_sources
from fewstep.errors import CheckpointError, ConfigError
from fewstep.generate import generate
from fewstep.methods import DMD2, METHODS, BatchNoise, Consistency, EDMTeacher, KacTeacher, Progressive, register_method
from fewstep.methods.dmd2 import distribution_matching_grad, distribution_matching_loss
from fewstep.methods.progressive import halving_stages, progressive_target
from fewstep.methods.student import DistilledStudent, ddim_step
from fewstep.samplers import SeededNoise, sample
from fewstep.samplers.grids import nested_sigmas
from fewstep.samplers.solvers import sample_euler
from fewstep.train import train

from helpers import DDIL, SHAPE, TINY, UNET, randomize, run_module, student, teacher

# -- grids and samplers --------------------------------------------------------------------------------------


def test_nested_grid_lies_inside_the_grid_of_twice_the_steps():
    for n in (1, 2, 4, 16):
        coarse, fine = nested_sigmas(n), nested_sigmas(2 * n)
        assert coarse[0] == 80.0 and coarse[-1] == 0 and len(coarse) == n + 1
        torch.testing.assert_close(fine[::2], coarse)
        assert (coarse[:-1] > 0).all() and (coarse.diff() < 0).all()


def test_consistency_sampler_counts_one_call_per_step_and_renoises_with_the_seeds():
    gauss = Gaussian.benchmark(dim=4)
    for steps in (1, 2, 4):
        calls = []

        def denoiser(x, sigma):
            calls.append(sigma)
            return gauss.denoiser(x, sigma)

        noise = SeededNoise([0, 1, 2])
        x = sample(denoiser, noise.randn((4,), dtype=torch.float64), "consistency", steps, generator=noise, grid="nested")
        assert len(calls) == steps and torch.isfinite(x).all()
        if steps == 1:  # one step is the denoiser at sigma_max
            z = SeededNoise([0, 1, 2]).randn((4,), dtype=torch.float64)
            torch.testing.assert_close(x, gauss.denoiser(80.0 * z, 80.0))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampling_of_the_exact_consistency_function_gives_the_exact_law_at_any_steps(steps):
    # for N(0, SD^2) the probability-flow map from sigma to 0 is f(x, sigma) = x SD / sqrt(SD^2 + sigma^2)
    sd = 0.5

    def consistency_fn(x, sigma):
        return x * sd / (sd**2 + sigma.view(-1, 1) ** 2).sqrt()

    noise = SeededNoise(range(20_000))
    x = sample(consistency_fn, noise.randn((2,), dtype=torch.float64), "consistency", steps, generator=noise, grid="nested")
    assert abs(x.std().item() / sd - 1) < 4 * (1 / (2 * 40_000)) ** 0.5


# -- progressive distillation --------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_progressive_target_makes_one_student_ddim_step_equal_two_teacher_steps_on_a_gaussian(steps):
    gauss = Gaussian.benchmark(dim=16)
    student_grid, teacher_grid = nested_sigmas(steps), nested_sigmas(2 * steps)
    x0 = gauss.sample(8, torch.Generator().manual_seed(1))
    for k in range(steps):  # every student step, the last one (to sigma = 0) included
        sigma_t, sigma_mid, sigma_s = student_grid[k], teacher_grid[2 * k + 1], student_grid[k + 1]
        x_t = x0 + sigma_t * torch.randn(x0.shape, dtype=x0.dtype, generator=torch.Generator().manual_seed(k))
        per_sample = [s.expand(8) for s in (sigma_t, sigma_mid, sigma_s)]
        target = progressive_target(gauss.denoiser, x_t, *per_sample)
        one_student_step = ddim_step(x_t, target, per_sample[0], per_sample[2])
        two_teacher_steps = sample_euler(gauss.denoiser, x_t, torch.stack([sigma_t, sigma_mid, sigma_s]))
        torch.testing.assert_close(one_student_step, two_teacher_steps, rtol=1e-10, atol=1e-10)


def test_a_progressive_student_that_outputs_the_target_has_zero_loss_and_samples_in_its_own_steps():
    method = student(Progressive, student_steps=2)
    x0 = torch.randn(4, *SHAPE)
    loss = method.loss(x0, None, BatchNoise(4, "cpu", torch.Generator().manual_seed(0)))
    assert loss > 0
    # a student identical to its teacher's two-step map: replace its denoiser by the target it is trained on
    levels, fine = method.student_sigmas, method.grid(4)
    x = x0 + levels[0] * torch.randn_like(x0)
    k = torch.zeros(4, dtype=torch.long)
    target = progressive_target(method.teacher_denoise, x, levels[k], fine[2 * k + 1], levels[k + 1])
    method.denoiser = lambda x_, sigma_, labels=None: target
    assert method.state_loss(x, k, None, BatchNoise(4, "cpu")) == 0
    del method.denoiser
    samples, _, nfe = generate(method, 3, "euler", 2)
    assert nfe == 2 and samples.shape == (3, *SHAPE)


def test_progressive_rounds_halve_from_start_to_end_and_reject_other_ends():
    assert halving_stages(32, 1) == [32, 16, 8, 4, 2, 1]
    assert halving_stages(8, 2) == [8, 4, 2]
    for start, end in ((32, 3), (6, 1), (4, 4), (4, 0)):
        with pytest.raises(ConfigError, match="end_steps must be start_steps halved"):
            halving_stages(start, end)


def test_progressive_guides_its_first_round_only():
    options = {"guidance": 2.0, "guide": "weak.ckpt", "guidance_interval": [0.5, 5.0], "start_steps": 8, "end_steps": 2}
    first = Progressive.stage_options(options, None, "teacher.ckpt", 8, 4, "heun")
    assert (first["guidance"], first["guide"], first["guidance_interval"]) == (2.0, "weak.ckpt", [0.5, 5.0])
    later = Progressive.stage_options(options, None, "round1.ckpt", 4, 2, None)  # taught by the guided round's student
    assert (later["guidance"], later["guide"], later["guidance_interval"]) == (0.0, None, None)
    assert "start_steps" not in later  # the pipeline's options stay with the pipeline
    taught = teacher(num_classes=3)
    method = student(Progressive, taught, num_classes=3, **{k: v for k, v in later.items() if k != "teacher_ckpt"})
    x, sigma, labels = torch.randn(3, *SHAPE), torch.full((3,), 1.5), torch.tensor([0, 1, 2])
    torch.testing.assert_close(method.teacher_denoise(x, sigma, labels), taught.denoiser(x, sigma, labels))


# -- consistency distillation --------------------------------------------------------------------------------


def test_consistency_function_is_the_identity_at_eps_and_not_above():
    method = randomize(student(Consistency, teacher_steps=8, sample_steps=4))
    x = 3 * torch.randn(5, *SHAPE)
    eps = method.hparams.sigma_min
    torch.testing.assert_close(method.denoiser(x, torch.full((5,), eps)), x, rtol=0, atol=1e-6)
    assert not torch.allclose(method.denoiser(x, torch.full((5,), 1.0)), x, atol=1e-3)


def test_consistency_loss_at_the_last_level_targets_the_teachers_ddim_step_exactly():
    method = student(Consistency, teacher_steps=8, skip=2, sample_steps=2)
    levels = method.levels
    assert levels[-1] == method.hparams.sigma_min and len(levels) == 9
    k = torch.full((3,), 7, dtype=torch.long)  # the next level down is eps: f^-(x, eps) = x
    x = levels[7] * torch.randn(3, *SHAPE)
    step = ddim_step(x, method.teacher_denoise(x, levels[k]), levels[k], levels[8].expand(3))
    expected = ((method.denoiser(x, levels[k]) - step) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(method.state_loss(x, k, None, BatchNoise(3, "cpu")), expected)


def test_consistency_target_network_is_an_ema_of_the_student():
    method = student(Consistency, teacher_steps=8, sample_steps=2, target_decay=0.9)
    before = [p.clone() for p in method.target_net.parameters()]
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    method.on_train_batch_end(None, None, 0)
    for old, new, online in zip(before, method.target_net.parameters(), method.net.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


def test_guided_consistency_student_takes_w_as_an_embedding_that_starts_at_zero():
    teacher_ = teacher(num_classes=3, conditional=True)
    method = student(Consistency, teacher_, num_classes=3, conditional=True, teacher_steps=8, sample_steps=2,
                     guidance_range=[1.0, 3.0])
    x, labels = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 0])
    sigma = torch.full((4,), 2.0)
    # at initialisation the w embedding adds nothing: every w gives the same output
    torch.testing.assert_close(method.denoiser(x, sigma, labels, torch.full((4,), 3.0)), method.denoiser(x, sigma, labels, torch.zeros(4)))
    loss = method.state_loss(x, torch.zeros(4, dtype=torch.long), labels, BatchNoise(4, "cpu"))
    loss.backward()
    assert method.net.embed.guidance[1].weight.grad.abs().sum() > 0  # w reaches the network
    samples, _, nfe = generate(method, 4, "consistency", 2, guidance=2.0)
    assert nfe == 2  # w is an input: no unconditional call


# -- DMD2 ----------------------------------------------------------------------------------------------------


def test_distribution_matching_gradient_is_zero_when_the_fake_score_equals_the_real_one():
    x0, real = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    assert distribution_matching_grad(x0, real, real).abs().max() == 0
    # and L_DM's gradient in x is the DM gradient itself
    fake = torch.randn(4, *SHAPE)
    grad = distribution_matching_grad(x0, real, fake)
    x = x0.clone().requires_grad_(True)
    distribution_matching_loss(x, grad).backward()
    torch.testing.assert_close(x.grad * x0.numel(), grad)


def test_dmd2_generator_loss_vanishes_while_its_critic_equals_the_teacher():
    method = student(DMD2, gan_weight=0.0, critic_gan_weight=0.0)
    fake = method.denoiser(80 * torch.randn(4, *SHAPE), torch.full((4,), 80.0))
    loss = method.generator_loss(fake, None, BatchNoise(len(fake), "cpu"))["dm"]
    assert loss == 0  # fake_net starts as the teacher's copy: D_fake = D_real
    with torch.no_grad():
        for p in method.fake_net.parameters():
            p.add_(0.1)
    assert method.generator_loss(fake, None, BatchNoise(len(fake), "cpu"))["dm"] > 0


def test_dmd2_backward_simulation_starts_at_noise_and_uses_the_generators_own_steps():
    method = student(DMD2, student_steps=4)
    x0 = torch.zeros(256, *SHAPE)
    states, k = method.default_states(x0, None, BatchNoise(256, "cpu", torch.Generator().manual_seed(0)))
    levels = method.state_sigmas
    assert set(k.tolist()) == {0, 1, 2, 3}
    for level in range(4):  # x = x0_hat + sigma_k z, so the spread is about sigma_k around data-range values
        spread = states[k == level].std()
        assert 0.5 * levels[level] < spread < 1.5 * levels[level] + 1.0


# -- reflection and DDIL -------------------------------------------------------------------------------------


def test_reflection_keeps_teacher_and_student_predictions_in_the_data_range():
    loud = teacher(scale=3.0)  # a teacher whose predictions leave [-1, 1]
    x, sigma = 5 * torch.randn(8, *SHAPE), torch.full((8,), 5.0)
    plain = student(Progressive, loud, student_steps=2)
    assert plain.teacher_denoise(x, sigma).abs().max() > 1
    ddil = student(Progressive, loud, student_steps=2, ddil=DDIL)
    assert ddil.teacher_denoise(x, sigma).abs().max() <= 1
    assert ddil.student_x0(x, sigma).abs().max() <= 1


def test_ddil_sources_follow_their_weights():
    n = 40_000
    sources = draw_sources([0.5, 0.2, 0.3], n, torch.Generator().manual_seed(0))
    for code, p in enumerate([0.5, 0.2, 0.3]):
        share = (sources == code).float().mean().item()
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert (draw_sources([0, 0, 2.0], 100) == 2).all()


@pytest.mark.parametrize("weights", [[0, 0, 0], [1, -1, 1], [float("nan"), 1, 1], [1, 1]])
def test_ddil_weights_without_a_positive_sum_are_refused_in_one_line(weights):
    with pytest.raises(ConfigError, match=r"positive sum") as error:
        check_weights(weights)
    assert "\n" not in str(error.value)


def test_rollout_buffer_never_exceeds_its_bound_and_keeps_the_newest():
    buffer = RolloutBuffer(10)
    for i in range(7):
        buffer.add(torch.full((3, 2), float(i)), torch.full((3,), float(i)))
        assert len(buffer) <= 10 and buffer.x.shape[0] == 10
    assert len(buffer) == 10 and buffer.added == 21
    assert sorted(buffer.sigma.tolist()) == [3, 4, 4, 4, 5, 5, 5, 6, 6, 6]  # the oldest were overwritten
    buffer.add(torch.arange(30.0).view(15, 2), torch.arange(15.0))  # more than the capacity at once
    assert sorted(buffer.sigma.tolist()) == list(range(5, 15))
    x, sigma, labels = buffer.sample(50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 2) and (labels == -1).all() and torch.equal(x[:, 0], 2 * sigma)
    copy = RolloutBuffer(10)
    copy.load_state_dict(buffer.state_dict())
    assert torch.equal(copy.x, buffer.x) and copy.added == buffer.added
    with pytest.raises(ConfigError, match="ddil.buffer.size"):
        RolloutBuffer(0)
    with pytest.raises(ValueError, match="empty"):
        RolloutBuffer(3).sample(1)


def test_rollout_states_refresh_on_schedule_once_per_step():
    calls = []

    def rollout(source, n):
        calls.append(source)
        return torch.randn(n, 2), torch.ones(n), None

    states = RolloutStates(data=None, size=8, refresh_every=3, refresh_size=2)
    for step in [0, 0, 1, 2, 3, 4, 5, 6, 6, 7, 8, 9]:
        states.refresh(step, rollout)
    assert states.refreshes == [0, 3, 6, 9]
    assert calls == ["teacher", "student"] * 4
    assert all(len(b) == 8 for b in states.buffers.values())
    for bad in ({"size": 0}, {"refresh_every": 0}, {"refresh_size": 0}, {"sources": ["nope"]}):
        with pytest.raises(ConfigError):
            RolloutStates(data=None, **bad)


def test_student_rollouts_are_stored_at_the_training_levels():
    method = student(Consistency, teacher_steps=8, sample_steps=4, ddil=DDIL)
    for source, visits in (("teacher", 8), ("student", 4)):
        x, sigma, labels = method.rollout(source, 3)
        assert x.shape == (3 * visits, *SHAPE) and labels is None
        levels = method.state_sigmas
        assert all(torch.isclose(levels, s).any() for s in sigma)
        assert len(set(sigma.tolist())) == visits


# -- bad input -----------------------------------------------------------------------------------------------


def test_a_teacher_of_another_process_or_network_is_refused_in_one_line():
    kac = KacTeacher(net=UNET, data_shape=SHAPE)
    with pytest.raises(CheckpointError, match="not an EDM-space denoiser"):
        student(Progressive, kac)
    wide = EDMTeacher(net={**UNET, "model_channels": 16}, data_shape=SHAPE)
    with pytest.raises(CheckpointError, match="its net is"):
        student(DMD2, wide)


def test_bad_student_options_are_refused_in_one_line():
    for cls, kwargs, match in (
        (Consistency, {"sample_steps": 3, "teacher_steps": 8}, "must divide"),
        (Consistency, {"skip": 0}, "method.skip"),
        (Consistency, {"loss": "l3"}, "unknown consistency loss"),
        (DMD2, {"critic_steps": 0}, "critic_steps"),
        (Progressive, {"ddil": {"b_fwd": 0, "b_teacher": 0, "b_student": 0}}, "positive sum"),
        (Progressive, {"ddil": {"b_fwd": 1, "weights": 2}}, "not 'weights'"),
    ):
        with pytest.raises(ConfigError, match=match):
            cls(net=UNET, data_shape=SHAPE, **kwargs)


# -- runs as a user starts them ------------------------------------------------------------------------------


def fit_overrides(tmp_path):
    return [*TINY, "data=digits", f"paths.root={tmp_path}/outputs", "teacher.max_steps=2", "callbacks.sample_grid.n=4"]


CHECKPOINTS = [
    "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
]


@pytest.mark.parametrize("method", [
    ["method=consistency", "method.teacher_steps=8", "method.sample_steps=2"],
    ["method=dmd2", "method.student_steps=2", "method.critic_steps=2"],
    ["method=consistency", "ddil=default", "method.teacher_steps=8", "method.sample_steps=2",
     "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2", "data.num_workers=2"],
    ["method=dmd2", "ddil=default", "method.critic_steps=1", "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2"],
    ["method=sid"], ["method=sida"], ["method=fdistill", "method.critic_steps=2"],
])
def test_each_student_trains_from_the_command_line_and_samples_from_its_checkpoint(compose_cfg, tmp_path, method):
    cfg = compose_cfg("train", [*method, *fit_overrides(tmp_path), *CHECKPOINTS, "trainer.max_steps=3"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    if "ddil=default" in method:
        shares = [metrics[f"ddil/{s}_fraction"] for s in ("fwd", "teacher", "student")]
        assert abs(sum(shares) - 1) < 1e-6
    model = load_method(tmp_path / "checkpoints" / "last.ckpt")
    assert model.hparams.teacher_ckpt and (model.hparams.ddil is not None) == ("ddil=default" in method)
    steps = model.hparams.get("student_steps", 2)  # a one-step generator samples in one step
    samples, _, nfe = generate(model, 2, "consistency", steps)
    assert nfe == steps and torch.isfinite(samples).all()


def test_ddil_buffers_are_refreshed_and_checkpointed(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [
        "method=consistency", "ddil=default", "method.teacher_steps=8", "method.sample_steps=2",
        "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2", "ddil.buffer.size=20", *fit_overrides(tmp_path),
        *CHECKPOINTS, "trainer.max_steps=5",
    ])
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["RolloutStates"]
    refreshes = list(range(0, checkpoint["global_step"], 2))  # the steps trained before the checkpoint, every 2nd
    assert state["refreshes"] == refreshes and len(refreshes) >= 2
    teacher_buffer, student_buffer = state["buffers"]["teacher"], state["buffers"]["student"]
    # refreshes x trajectories x the levels each visits (the teacher all 8, the 2-step student 2)
    assert teacher_buffer["added"] == len(refreshes) * 2 * 8 and student_buffer["added"] == len(refreshes) * 2 * 2
    assert teacher_buffer["x"].shape[0] == 20  # bounded


def test_progressive_runs_its_halving_rounds_each_from_the_last(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [
        "method=progressive", "summary=false", "method.start_steps=4", "method.steps_per_round=2", *fit_overrides(tmp_path),
        *CHECKPOINTS,
    ])
    train(cfg)
    first = load_method(tmp_path / "stage1_2steps" / "checkpoints" / "last.ckpt")
    second = load_method(tmp_path / "stage2_1steps" / "checkpoints" / "last.ckpt")
    assert isinstance(first, Progressive) and first.hparams.student_steps == 2 and second.hparams.student_steps == 1
    assert second.hparams.teacher_ckpt == str(tmp_path / "stage1_2steps" / "checkpoints" / "last.ckpt")
    samples, _, nfe = generate(second, 2, "euler", 1)
    assert nfe == 1


@pytest.mark.parametrize("override, match", [
    (["method=gdd"], "ddil=default works on EDM-space students"),
    (["method=edm_teacher"], "this method has no teacher: use ddil=none"),
    (["ddil.b_fwd=0", "ddil.b_teacher=0", "ddil.b_student=0"], "positive sum"),
    (["ddil.buffer.size=0"], "ddil.buffer.size"),
])
def test_bad_ddil_settings_stop_the_run_in_one_line(compose_cfg, tmp_path, override, match):
    base = [*TINY, "data=digits"] if "method=edm_teacher" in override else fit_overrides(tmp_path)  # no teacher group
    cfg = compose_cfg("train", ["method=consistency", "ddil=default", *base, *override, "trainer.max_steps=1"])
    with pytest.raises(ConfigError, match=match) as error:
        train(cfg)
    assert "\n" not in str(error.value)


def test_sources_of_weight_zero_get_no_rollout_buffer(compose_cfg, tmp_path):
    from fewstep.data import Digits
    from fewstep.distill import with_ddil, with_rollouts

    cfg = with_ddil(compose_cfg("train", ["method=progressive", "ddil=default", "ddil.b_teacher=0", *fit_overrides(tmp_path)]))
    states = with_rollouts(cfg, Digits())
    assert list(states.buffers) == ["student"] and isinstance(states.data, Digits)
    assert with_rollouts(compose_cfg("train", ["method=progressive"]), "data") == "data"  # no DDIL: the data itself


@pytest.mark.slow
@pytest.mark.parametrize("old", [["method=ddil", "ddil.base=dmd2"], ["ddil.base=dmd2"]])
def test_the_old_ddil_command_line_is_refused_in_one_line_that_gives_the_new_one(tmp_path, old):
    result = run_module("fewstep.train", *old, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "fewstep.train method=" in result.stderr and "ddil=default" in result.stderr


class HalfwayStudent(DistilledStudent):
    """A new EDM-space student in a few lines: the student's x0 at a state is the teacher's one DDIM step halfway
    down to the next level, denoised by the teacher (an arbitrary target; the point is that DDIL needs no edit)."""

    def __init__(self, *args, student_steps: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("student_steps")

    @property
    def teacher_steps(self) -> int:
        return 2 * self.hparams.student_steps

    def state_loss(self, x, k, class_labels, rng):
        sigma = self.state_sigmas[k]
        target = self.teacher_denoise(x, sigma, class_labels)
        return ((self.denoiser(x, sigma, class_labels) - target) ** 2).mean()


def test_a_new_student_is_a_module_and_a_config_and_ddil_works_on_it_without_other_edits(compose_cfg, tmp_path, request):
    register_method("halfway", HalfwayStudent, "a test's own student")  # as its module would: its checkpoints then load
    request.addfinalizer(lambda: METHODS.pop("halfway"))
    config_dir = tmp_path / "my_conf" / "method"
    config_dir.mkdir(parents=True)
    (config_dir / "halfway.yaml").write_text(
        "defaults:\n  - /teacher@_global_.teacher: edm_teacher\n  - _self_\n"
        f"_target_: {__name__}.HalfwayStudent\n_recursive_: false\nstudent_steps: 2\n"
        "optimizer: {_target_: torch.optim.Adam, _partial_: true, lr: 1.0e-4}\n"
    )
    cfg = compose_cfg("train", [
        "method=halfway", "ddil=default", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", *fit_overrides(tmp_path),
        *CHECKPOINTS, "trainer.max_steps=3", "ddil.buffer.refresh_every=2", "ddil.buffer.refresh_size=2",
    ])
    metrics = train(cfg)
    shares = [metrics[f"ddil/{s}_fraction"] for s in ("fwd", "teacher", "student")]
    assert abs(sum(shares) - 1) < 1e-6
    student = load_method(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(student, HalfwayStudent) and student.hparams.ddil["b_student"] == 0.25
