"""The sampling entry points (fewstep.sample, fewstep.evaluate, fewstep.fid_reference): every bad option is one line
and exit 2, non-finite samples never become a result with exit 0, and long work shows its progress."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.errors import ConfigError, FewstepError
from fewstep.generate import NonFiniteSamples, generate
from fewstep.options import check_evaluate_options, check_reference_options, check_sample_options, check_sampler
from fewstep.progress import Progress, ProgressLine, TextTask

from helpers import REPO, run_module

PROGRESS = re.compile(r"^sampling (\d+)/2000 \(\d+%\) \| [\d.e+]+ samples/s \| ETA \d+:\d\d:\d\d \| elapsed \d+:\d\d:\d\d$")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # domain classifiers and real statistics


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without a CUDA GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- A: bad options, one line each

# (overrides, what the message says: the key, the value and the fix)
SAMPLING_CASES = [
    (["nfe=abc"], "nfe=abc is not a whole number (network evaluations per sample): e.g. nfe=35"),
    (["n=abc"], "n=abc is not a whole number"),
    (["seed=abc"], "seed=abc is not a whole number (sample i uses seed + i): e.g. seed=0"),
    (["batch_size=0"], "batch_size=0: must be >= 1 (samples per batch), e.g. batch_size=256"),
    (["batch_size=-3"], "batch_size=-3: must be >= 1"),
    (["device=nope"], "device=nope is not a device torch knows: use device=auto"),
    (["device=cuda"], "device=cuda: no CUDA GPU is visible: use device=cpu"),
    (["device=cuda:1"], "device=cuda:1: no CUDA GPU is visible: use device=cpu"),
    (["device=meta"], "device=meta: fewstep runs on cpu, cuda or mps"),
    (["+sampler.bogus=1"], "sampler.bogus=1: sampler 'heun' has no option 'bogus' (it takes: sigma_min, sigma_max, rho)"),
    (["sampler=euler", "+sampler.s_churn=1"], "sampler.s_churn=1: sampler 'euler' has no option 's_churn'"),
    (["sampler=kac_euler", "+sampler.eta=0.5"], "sampler 'kac_euler' has no option 'eta' (it takes: denoise)"),
    (["guidance=nan"], "guidance=nan: must be a finite number (the classifier-free guidance scale w"),
    (["guidance=inf"], "guidance=inf: must be a finite number"),
    (["guidance=-inf"], "guidance=-inf: must be a finite number"),
    (["guidance=1e30"], "guidance=1e+30: must be between 0 and 100"),
    (["guidance=101"], "guidance=101: must be between 0 and 100"),
    (["guidance=-1"], "guidance=-1: must be between 0 and 100"),
    (["guidance=abc"], "guidance=abc is not a number"),
    (["nfe=2.5"], "nfe=2.5 is not a whole number"),
    (["nfe=0"], "nfe=0: must be >= 1"),
    (["nfe=true"], "nfe=true is not a whole number"),
    (["n=1e4"], "n=10000.0 is not a whole number (the number of "),  # ... and names the fix: n=10000
    (["seed=1.5"], "seed=1.5 is not a whole number"),
    (["seed=9223372036854775807"], "must fit in a signed 64-bit integer"),
    (["sampler=ddim", "sampler.eta=nan"], "sampler.eta=nan: must be a finite number (an option of sampler 'ddim')"),
    (["sampler=ddim", "sampler.eta=abc"], "sampler.eta=abc is not a number"),
    (["sampler=ddim", "sampler.eta=-1"], "sampler.eta=-1: must be >= 0"),
    (["sampler=edm_sde", "sampler.s_churn=inf"], "sampler.s_churn=inf: must be a finite number"),
    (["sampler=lazy_ode", "sampler.sigma_data=inf"], "sampler.sigma_data=inf: must be a finite number"),
    (["sampler=lazy_ode", "sampler.sigma_data=0"], "sampler.sigma_data=0: must be > 0"),
    (["+sampler.sigma_max=nan"], "sampler.sigma_max=nan: must be a finite number"),
    (["sampler=seeds2", "sampler.c2=2"], "sampler.c2=2: must be between 0 and 1"),
    (["sampler=seeds2", "+sampler.weights=simpson"], "sampler.weights=simpson: choose one of phi1, phi2"),
    (["sampler=kac_euler", "+sampler.denoise=[2]"], "sampler.denoise=[2]: each entry must be a fraction of T in (0, 1]"),
    (["sampler=kac_euler", "+sampler.denoise=0.1"], "sampler.denoise=0.1: give a list of fractions"),
    (["sampler.name=nope"], "unknown sampler 'nope': choose one of"),
    (["progress.interval=-1"], "progress.interval=-1: must be >= 0"),
    (["progress.interval=nan"], "progress.interval=nan: must be a finite number"),
    (["progress.mode=tqdm"], "progress.mode=tqdm: choose auto"),
]


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("overrides,expected", SAMPLING_CASES)
def test_sample_refuses_bad_options_in_one_line(compose_cfg, tmp_path, overrides, expected):
    from fewstep.sample import sample_checkpoint

    # a checkpoint that does not exist: the options are refused before anything is read
    cfg = compose_cfg("sample", ["ckpt=/nonexistent.ckpt", *overrides])
    message = one_line_error(sample_checkpoint, cfg)
    assert expected in message, message
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(
    "overrides,expected",
    [
        *SAMPLING_CASES,
        (["repeats=abc"], "repeats=abc is not a whole number (sample sets scored, with disjoint seeds): e.g. repeats=3"),
        (["repeats=0"], "repeats=0: score at least one sample set (repeats>=1)"),
        (["repeats=1.5"], "repeats=1.5 is not a whole number"),
        (["n=-1"], "n=-1: ask for at least one image (n>=1)"),
        (["metric=is"], "unknown metric 'is'"),
    ],
)
def test_evaluate_refuses_bad_options_in_one_line(compose_cfg, overrides, expected):
    from fewstep.evaluate import evaluate

    cfg = compose_cfg("evaluate", ["ckpt=/nonexistent.ckpt", *overrides])
    message = one_line_error(evaluate, cfg)
    assert expected in message, message


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["n=abc"], "n=abc is not a whole number"),
        (["n=1"], "n=1: reference statistics need at least 2 images (n>=2, or n=null for all)"),
        (["n=2.5"], "n=2.5 is not a whole number"),
        (["batch_size=0"], "batch_size=0: must be >= 1 (images per Inception forward pass)"),
        (["batch_size=abc"], "batch_size=abc is not a whole number"),
        (["device=nope"], "device=nope is not a device torch knows"),
        (["device=cuda"], "device=cuda: no CUDA GPU is visible: use device=cpu"),
        (["progress.interval=inf"], "progress.interval=inf: must be a finite number"),
    ],
)
def test_fid_reference_refuses_bad_options_in_one_line(compose_cfg, overrides, expected):
    from fewstep.fid_reference import fid_reference

    cfg = compose_cfg("fid_reference", ["data=digits", *overrides])
    message = one_line_error(fid_reference, cfg)
    assert expected in message, message


def test_missing_checkpoint_is_one_line(compose_cfg):
    cfg = compose_cfg("sample", [])
    assert "ckpt=???: pass ckpt=PATH" in one_line_error(check_sample_options, cfg)


@pytest.mark.parametrize("sampler", sorted(p.stem for p in (REPO / "conf" / "sampler").glob("*.yaml")))
def test_every_sampler_config_passes_as_shipped(compose_cfg, sampler):
    cfg = compose_cfg("evaluate", ["ckpt=x.ckpt", f"sampler={sampler}"])
    check_evaluate_options(cfg)  # lazy_*'s sigma_data: null (the model's) included


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=-5", "device=cpu", "guidance=100", "nfe=1", "n=1", "batch_size=1"],
        ["device=auto", "guidance=0"],
        ["sampler=edm_sde", "sampler.s_churn=0", "+sampler.sigma_min=0.01", "+sampler.rho=3"],
        ["sampler=seeds2", "sampler.c2=1", "+sampler.weights=phi1"],
        ["sampler=kac_heun", "+sampler.denoise=[0.2,0.1]"],
        ["sampler=kac_heun", "+sampler.denoise=[]"],
        ["progress.interval=0", "progress.mode=text"],
    ],
)
def test_good_options_pass(compose_cfg, overrides):
    check_sample_options(compose_cfg("sample", ["ckpt=x.ckpt", *overrides]))


def test_reference_n_null_means_all(compose_cfg):
    check_reference_options(compose_cfg("fid_reference", ["n=null"]))


def test_sampler_options_follow_the_signature():
    # an option added to a solver function is an option at once; one it lacks is refused
    check_sampler({"sampler": {"name": "edm_sde", "s_churn": 10.0, "s_tmin": 0.1, "s_tmax": 20, "s_noise": 1.0}})
    with pytest.raises(ConfigError, match="has no option 'eta'"):
        check_sampler({"sampler": {"name": "edm_sde", "eta": 1.0}})


# ---------------------------------------------------------------- B: no wrong answer with exit 0


def stub_method(bad_seeds=()):
    """A method whose sampler returns the seed as the sample, NaN for ``bad_seeds``."""

    def sample_batch(noise, sampler, nfe, labels, guidance, grid, **options):
        x = torch.tensor(noise.seeds, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
        for i, seed in enumerate(noise.seeds):
            if seed in bad_seeds:
                x[i, 0, 1, 1] = float("nan")
        return x, nfe

    return SimpleNamespace(device=torch.device("cpu"), num_classes=0, sample_batch=sample_batch)


def test_generate_stops_at_the_first_non_finite_batch_and_names_the_seeds():
    seen = []
    with pytest.raises(NonFiniteSamples) as error:
        generate(stub_method(bad_seeds={13, 14}), 20, "euler", 1, seed=3, batch_size=4, callback=seen.append)
    message = str(error.value)
    assert "\n" not in message
    assert "2 of the 4 samples with seeds 11 to 14 hold NaN or infinite values (seeds 13, 14)" in message
    assert "check the checkpoint (python -m fewstep.sample weights=raw ...)" in message
    assert [info["done"] for info in seen] == [4, 8]  # the batches before it, reported; nothing after it
    # the check can be left out (training's callbacks do), and a clean run reports every batch
    samples, _, _ = generate(stub_method(bad_seeds={13}), 20, "euler", 1, seed=3, batch_size=4, check_finite=False)
    assert samples.isnan().any()
    seen.clear()
    samples, _, _ = generate(stub_method(), 10, "euler", 1, seed=3, batch_size=4, callback=seen.append)
    assert [(info["i"], info["done"], info["total"], list(info["seeds"])) for info in seen] == [
        (0, 4, 10, [3, 4, 5, 6]), (1, 8, 10, [7, 8, 9, 10]), (2, 10, 10, [11, 12])
    ]
    assert samples[:, 0, 0, 0].tolist() == list(range(3, 13))


@pytest.fixture
def nan_model(tiny_checkpoint, monkeypatch):
    """The tiny teacher, its denoiser returning NaN: the checkpoint passes load_method's probe, sampling does not."""
    from fewstep.checkpoints import load_method

    def load_nan(path, map_location="cpu", weights="ema"):
        method = load_method(path, map_location, weights)
        method.denoiser = lambda x, sigma, class_labels=None: torch.full_like(x, float("nan"))
        return method

    return load_nan


@pytest.mark.slow
def test_sample_with_nan_outputs_stops_in_one_line_and_writes_nothing(tiny_checkpoint, nan_model, compose_cfg,
                                                                      tmp_path, monkeypatch):
    import fewstep.sample

    monkeypatch.setattr(fewstep.sample, "load_method", nan_model)
    _, ckpt = tiny_checkpoint
    cfg = compose_cfg("sample", [f"ckpt={ckpt}", "sampler=euler", "nfe=2", "n=6", "batch_size=4"])
    with pytest.raises(NonFiniteSamples) as error:
        fewstep.sample.sample_checkpoint(cfg)
    assert isinstance(error.value, FewstepError) and "\n" not in str(error.value)
    assert "4 of the 4 samples with seeds 0 to 3 hold NaN" in str(error.value)
    assert not list(tmp_path.glob("samples.*"))


@pytest.mark.slow
def test_evaluate_with_nan_outputs_scores_nothing(tiny_checkpoint, nan_model, compose_cfg, tmp_path, monkeypatch):
    import fewstep.evaluate

    monkeypatch.setattr(fewstep.evaluate, "load_method", nan_model)
    monkeypatch.setattr(fewstep.evaluate, "score", lambda *args: pytest.fail("scored NaN samples"))
    _, ckpt = tiny_checkpoint
    cfg = compose_cfg("evaluate", [f"ckpt={ckpt}", "sampler=euler", "nfe=1", "n=8", "metric=fid_domain"])
    with pytest.raises(NonFiniteSamples, match="the model returns non-finite values"):
        fewstep.evaluate.evaluate(cfg)
    assert not (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_evaluate_refuses_a_non_finite_score(tiny_checkpoint, compose_cfg, tmp_path, monkeypatch):
    import fewstep.evaluate

    monkeypatch.setattr(fewstep.evaluate, "score", lambda *args: float("nan"))
    _, ckpt = tiny_checkpoint
    cfg = compose_cfg("evaluate", [f"ckpt={ckpt}", "sampler=euler", "nfe=1", "n=8", "metric=fid_domain"])
    with pytest.raises(FewstepError, match=r"fid_domain of the samples with seeds 0 to 7 is nan"):
        fewstep.evaluate.evaluate(cfg)
    assert not (tmp_path / "result.json").exists()


class StubFeatures(nn.Module):
    """A stand-in for the FID Inception network (2048 features of uint8 images), NaN on request: fast on a CPU."""

    num_features = 2048

    def __init__(self, nan: bool = False):
        super().__init__()
        self.nan = nan
        self.proj = nn.Linear(64, 2048)  # digits are 8 x 8

    def forward(self, images):
        out = self.proj(images.float().flatten(1)[:, :64] / 255)
        return torch.full_like(out, float("nan")) if self.nan else out


@pytest.mark.filterwarnings("ignore:FID from n=50")
@pytest.mark.parametrize("nan", [False, True])
def test_fid_reference_progress_and_non_finite_features(compose_cfg, tmp_path, monkeypatch, capsys, nan):
    import fewstep.metrics.inception
    from fewstep.fid_reference import fid_reference

    monkeypatch.setattr(fewstep.metrics.inception, "InceptionFeatures", lambda: StubFeatures(nan))
    out = tmp_path / "ref.npz"
    cfg = compose_cfg("fid_reference", ["data=digits", "n=50", "batch_size=20", f"out={out}", "progress.interval=0"])
    if nan:
        with pytest.raises(ConfigError, match="features of the 50 images are not finite: no statistics were written"):
            fid_reference(cfg)
        assert not out.exists()
        return
    fid_reference(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("features ")] == [
        "features 20/50 (40%)", "features 40/50 (80%)", "features 50/50 (100%)"
    ]
    with np.load(out) as npz:
        assert int(npz["n"]) == 50 and np.isfinite(npz["sigma"]).all()


def test_fid_reference_refuses_non_finite_images():
    from fewstep.fid_reference import uint8_batches

    images = [(torch.zeros(1, 2, 2), 0) for _ in range(7)]
    images[5] = (torch.full((1, 2, 2), float("nan")), 0)
    batches = uint8_batches(images, 7, 3)
    assert next(batches).shape == (3, 1, 2, 2)
    with pytest.raises(ConfigError, match="training images 5 of the data set hold NaN or infinite values"):
        next(batches)


# ---------------------------------------------------------------- C: progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_text_task_prints_done_total_rate_and_eta_at_interval_zero():
    clock, lines = FakeClock(), []
    task = TextTask("sampling", 1000, "samples", 0, lines.append, clock)
    clock.now += 10
    task.update(100)  # 100 in 10 s: 10/s, 900 left
    clock.now += 5
    task.update(200)  # 100 in 5 s since the previous line; 200 in 15 s overall: 800 left at 13.3/s
    clock.now += 45
    task.advance(800)
    task.close()  # the last line said it all: nothing more
    assert lines == [
        "sampling 100/1000 (10%) | 10 samples/s | ETA 0:01:30 | elapsed 0:00:10",
        "sampling 200/1000 (20%) | 20 samples/s | ETA 0:01:00 | elapsed 0:00:15",
        "sampling 1000/1000 (100%) | 17.8 samples/s | ETA 0:00:00 | elapsed 0:01:00",
    ]


def test_text_task_interval():
    clock, lines = FakeClock(), []
    task = TextTask("features", 100, "images", 30, lines.append, clock)
    for _ in range(10):
        clock.now += 7
        task.advance(10)
    task.close()
    # the first update, then the first one 30 s after a line (t = 42, 77 s: 35 s apart), and the end
    assert [line.split(" | ")[0] for line in lines] == [
        "features 10/100 (10%)", "features 60/100 (60%)", "features 100/100 (100%)"
    ]
    assert lines[-1].endswith("elapsed 0:01:10")


def test_progress_line_is_training_s_arithmetic():
    clock = FakeClock()
    line = ProgressLine(clock)
    line.start(done=500)  # a resumed run: 500 steps were done before this fit
    clock.now += 20
    line.pause(10)  # a validation: left out of the rate, not out of the time left
    assert line.line("step", 600, 1000, ["train/loss 0.5"]) == (
        "step 600/1000 (60%) | train/loss 0.5 | 10 it/s | ETA 0:01:20 | elapsed 0:00:20"
    )
    assert line.printed == 600 and not line.due(30) and line.due(0)


def test_progress_modes_and_tracking():
    stream = io.StringIO()
    text = Progress(interval=0, mode="text", stream=stream)
    assert list(text.track(iter([[1, 2], [3]]), "reading", 3, "images")) == [[1, 2], [3]]
    assert [line.split(" | ")[0] for line in stream.getvalue().splitlines()] == ["reading 2/3 (66%)", "reading 3/3 (100%)"]
    assert not Progress(mode="auto", stream=stream).rich  # a StringIO is no terminal
    rich = Progress(mode="rich", stream=io.StringIO())
    assert rich.rich
    with rich.task("sampling", 4, "samples") as task:  # a rich bar, drawn into the stream
        task.update(4)
    with pytest.raises(ValueError, match="choose auto, rich or text"):
        Progress(mode="tqdm")
    quiet = io.StringIO()
    with Progress(interval=0, stream=quiet, enabled=False).task("x", 2) as task:
        task.update(2)
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_evaluate_shows_each_phase(tiny_checkpoint, compose_cfg, capsys):
    from fewstep.evaluate import evaluate

    _, ckpt = tiny_checkpoint
    cfg = compose_cfg("evaluate", [f"ckpt={ckpt}", "sampler=euler", "nfe=1", "n=30", "batch_size=20", "repeats=2",
                                   "metric=fid_domain", "progress.interval=0"])
    with pytest.warns(UserWarning, match="biased"):
        row = evaluate(cfg)
    lines = capsys.readouterr().out.splitlines()
    heads = [line.split(" | ")[0] for line in lines]
    for k in (1, 2):
        assert f"set {k}/2 sampling 20/30 (66%)" in heads and f"set {k}/2 sampling 30/30 (100%)" in heads
        assert f"set {k}/2 features (samples) 30/30 (100%)" in heads
        assert f"set {k}/2 statistics: fid_domain from the features' mean and covariance ..." in lines
        assert any(line.startswith(f"set {k}/2 fid_domain = ") for line in lines)
    assert "set 1/2 features (real images) 30/30 (100%)" in heads
    assert "set 2/2 features (real images) 30/30 (100%)" not in heads  # read back from the cache: nothing to show
    assert row["repeats"] == 2


# ---------------------------------------------------------------- as a user runs them


@pytest.mark.slow
def test_bad_options_exit_2_with_one_line(tiny_checkpoint):
    root, ckpt = tiny_checkpoint
    for args in (["nfe=abc"], ["batch_size=0"], ["+sampler.bogus=1"], ["guidance=nan"], ["device=nope"]):
        result = run_module("fewstep.sample", f"ckpt={ckpt}", *args, cwd=root)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), (args, result.stderr)
    assert not list(root.glob("outputs/sample/*/samples.npz"))


@pytest.mark.slow
def test_sampling_into_a_file_shows_progress(tiny_checkpoint, tmp_path):
    # python -m fewstep.sample ckpt=CKPT n=2000 progress.interval=0 > log.txt
    root, ckpt = tiny_checkpoint
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "fewstep.sample", f"ckpt={ckpt}", "n=2000", "progress.interval=0", "sampler=euler",
             "nfe=1", f"paths.root={tmp_path}"],
            cwd=root, stdout=out, stderr=subprocess.PIPE, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert lines[0] == "sampling 2000 samples: euler at 1 NFE, 256 per batch, on cpu"
    progress = [PROGRESS.match(line) for line in lines if line.startswith("sampling ") and "/2000" in line]
    assert all(progress), lines
    assert [int(m.group(1)) for m in progress] == [256 * k for k in range(1, 8)] + [2000]  # every batch
    assert any(line.startswith("2000 samples, euler at 1 NFE") for line in lines)
    assert len(list(tmp_path.glob("sample/*/samples.npz"))) == 1
