"""tools/ddil_shift.py: the states of each source at the levels a student visits, and the student it measures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from test_students import SHAPE, randomize, student, teacher

from fewstep.methods import DMD2, Progressive

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ddil_shift.py"
spec = importlib.util.spec_from_file_location("ddil_shift", TOOL)
ddil_shift = importlib.util.module_from_spec(spec)
sys.modules["ddil_shift"] = ddil_shift
spec.loader.exec_module(ddil_shift)


def point_mass_student(steps: int, bias: float = 0.0) -> Progressive:
    """A progressive student whose denoiser is the exact one of data at 0 (D = 0), or that one moved by ``bias``."""
    method = student(Progressive, student_steps=steps)
    method.denoiser = lambda x, sigma, labels=None: torch.full_like(x, bias)
    return method


def test_each_source_gives_n_states_at_each_level_the_student_visits():
    method = point_mass_student(4)
    x0 = torch.zeros(2 * 32, *SHAPE)
    states = ddil_shift.source_states(method, x0, 32, seed=0)
    assert set(states) == set(ddil_shift.SOURCES)
    for x, k in states.values():
        assert x.shape == (4 * 32, *SHAPE)
        assert sorted(set(k.tolist())) == [0, 1, 2, 3]  # the 4-step student's levels, 0 excluded
        assert all((k == level).sum() == 32 for level in range(4))


def test_the_exact_students_own_states_have_the_forward_law_and_a_biased_students_do_not():
    """Data at 0 and D = 0: a DDIM step scales x by sigma_next / sigma, so the student's own state at sigma_k is
    sigma_k z, the forward law; a student biased by 0.5 ends its states 0.5 (1 - sigma_k / sigma_0) off it."""
    n = 256
    x0 = torch.zeros(2 * n, *SHAPE)
    for bias in (0.0, 0.5):
        method = point_mass_student(4, bias)
        states = ddil_shift.source_states(method, x0, n, seed=0)
        levels = method.state_sigmas
        for level in range(1, 4):
            own = states["student"][0][states["student"][1] == level]
            forward = states["fwd"][0][states["fwd"][1] == level]
            sigma = float(levels[level])
            assert abs(forward.std() / sigma - 1) < 0.03
            assert abs(own.std() / sigma - 1) < 0.03
            expected_mean = bias * (1 - sigma / float(levels[0]))
            assert abs(float(own.mean()) - expected_mean) < 0.05 * sigma + 1e-3
            assert abs(float(forward.mean())) < 0.05 * sigma


def test_losses_are_per_level_and_equal_for_sources_with_the_same_states():
    method = student(Progressive, student_steps=2)
    x0 = torch.randn(2 * 16, *SHAPE)
    states = ddil_shift.source_states(method, x0, 16, seed=0)
    rows = ddil_shift.level_losses(method, states, seed=0, batch_size=5)
    assert [row["level"] for row in rows] == [0, 1]
    assert all(row[s] > 0 for row in rows for s in ddil_shift.SOURCES)
    # at sigma_max the teacher's and the student's rollouts start from the same seeds: the same states and loss
    assert rows[0]["teacher"] == rows[0]["student"]
    assert rows[1]["teacher"] != rows[1]["student"]


def test_the_measured_student_keeps_its_saved_critic(monkeypatch):
    """Attaching a teacher re-initialises DMD2's critic from it; the tool must measure the trained one."""
    trained = randomize(student(DMD2, student_steps=2), seed=3)
    saved = {name: value.clone() for name, value in trained.state_dict().items()}
    files = {"student.ckpt": trained, "teacher.ckpt": teacher()}
    trained.hparams.teacher_ckpt = "teacher.ckpt"
    monkeypatch.setattr(ddil_shift, "load_method", lambda path: files[str(path)])
    measured = ddil_shift.attached(Path("student.ckpt"))
    assert measured.teacher is files["teacher.ckpt"]
    for name, value in measured.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_the_summary_gives_each_ratio_over_seeds_per_student_level_and_ddil():
    def row(seed_ratio, ddil):
        return {"method": "progressive", "steps": 2, "ddil": ddil, "sigma": 2.515, "fwd2/fwd": 1.0,
                "teacher/fwd": seed_ratio, "student/fwd": 2 * seed_ratio}

    lines = ddil_shift.summarise([row(1.0, False), row(1.2, False), row(0.9, True)])
    assert lines[2] == "| progressive | 2 | no | 2.52 | 2 | 1.00 ± 0.00 | 1.10 ± 0.14 | 2.20 ± 0.28 |"
    assert lines[3] == "| progressive | 2 | yes | 2.52 | 1 | 1.00 | 0.90 | 1.80 |"
