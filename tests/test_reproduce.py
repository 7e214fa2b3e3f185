"""The reproduction protocol's statistics (tools/reproduce.py): seeds, sampling spread and verdicts."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import reproduce


def rows(*pairs):
    return [{"value": min(p), "values": list(p), "recall": 0.5 + i / 10} for i, p in enumerate(pairs)]


def test_stat_averages_each_seeds_two_sets_then_over_seeds():
    s = reproduce.stat(rows((10, 12), (14, 14), (9, 11)))
    assert s.per_seed == [11, 14, 10]
    assert s.mean == pytest.approx(35 / 3)
    assert s.std == pytest.approx(statistics.stdev([11, 14, 10]))
    # one set's std from the pairs: E (v1 - v2)^2 / 2 over seeds
    assert s.spread == pytest.approx(math.sqrt((4 / 2 + 0 + 4 / 2) / 3))


def test_stat_of_another_key_takes_the_rows_own_value():
    s = reproduce.stat(rows((10, 12), (14, 14)), "recall")
    assert s.per_seed == [0.5, 0.6]
    assert math.isnan(s.spread)


def stat(*values):
    return reproduce.Stat(list(values), float("nan"))


def test_verdict_separates_real_differences_from_seed_noise():
    assert reproduce.verdict(stat(10, 10.2, 9.8), stat(20, 20.3, 19.7)) == "met"
    assert reproduce.verdict(stat(20, 20.3, 19.7), stat(10, 10.2, 9.8)) == "missed"
    assert reproduce.verdict(stat(10, 14, 6), stat(11, 15, 7)) == "within noise"  # a 1-point gap inside 4-point seeds


def test_verdict_of_one_seed_uses_the_sampling_spread_and_a_tie_is_not_met():
    one = reproduce.Stat([0.5], float("nan"))  # one seed of recall: no spread at all
    assert reproduce.verdict(one, reproduce.Stat([0.9], float("nan"))) == "no verdict (one seed)"
    assert reproduce.verdict(reproduce.Stat([0.0], 0.0), reproduce.Stat([0.0], 0.0)) == "within noise"
    ours, theirs = reproduce.Stat([10.0], 2.0), reproduce.Stat([12.0], 2.0)  # 2 points apart, noise 2 * 2 = 4
    assert reproduce.verdict(ours, theirs) == "within noise"
    assert reproduce.verdict(ours, reproduce.Stat([15.0], 2.0)) == "met"


def test_verdict_applies_the_claims_factor_and_direction():
    teacher = stat(10, 10.1, 9.9)
    assert reproduce.verdict(stat(11, 11.1, 10.9), teacher, 1.15) == "met"  # 1.10x within "15% of the teacher"
    assert reproduce.verdict(stat(13, 13.1, 12.9), teacher, 1.15) == "missed"  # 1.30x
    assert reproduce.verdict(stat(0.9, 0.91, 0.89), stat(0.8, 0.81, 0.79), lower_is_better=False) == "met"  # recall


def test_rows_are_saved_after_each_evaluation_and_reused(tmp_path, monkeypatch):
    calls = []

    def fake(ckpt, sampler, nfe, n, out, options=(), weights="ema"):
        calls.append((sampler, nfe) if weights == "ema" else (sampler, nfe, weights))
        return {"value": 1.0 * nfe, "values": [1.0 * nfe, 1.0 * nfe + 1]}

    monkeypatch.setattr(reproduce, "evaluate_row", fake)
    table = reproduce.Rows(tmp_path / "t.json")
    table.get("teacher", 0, Path("a.ckpt"), "heun", 4, 10)
    table.get("teacher", 0, Path("a.ckpt"), "heun", 4, 10)  # cached
    again = reproduce.Rows(tmp_path / "t.json")  # a resumed table reads what was saved
    again.get("teacher", 0, Path("a.ckpt"), "heun", 4, 10)
    again.get("teacher", 1, Path("b.ckpt"), "heun", 4, 10)
    assert calls == [("heun", 4), ("heun", 4)]
    assert [r["train_seed"] for r in json.loads((tmp_path / "t.json").read_text())] == [0, 1]
    assert len(again.select("teacher", "heun", 4)) == 2 and not again.select("teacher", "euler")
    only = reproduce.Rows(tmp_path / "t.json", seeds=[1])  # a table summarises the seeds it was asked for
    assert [r["train_seed"] for r in only.select("teacher", "heun", 4)] == [1]
    again.get("GDD, trained weights @ 500", 0, Path("a.ckpt"), "euler", 1, 10, weights="raw")  # evaluate weights=raw
    assert calls[-1] == ("euler", 1, "raw")


def test_parallel_writers_keep_each_others_rows(tmp_path, monkeypatch):
    """The seeds of a table run as processes (--jobs) that save into one file: none overwrites another's rows."""
    monkeypatch.setattr(reproduce, "evaluate_row", lambda *a, **k: {"value": 1.0})
    first, second = reproduce.Rows(tmp_path / "t.json"), reproduce.Rows(tmp_path / "t.json")  # both read an empty file
    first.get("teacher", 0, Path("a.ckpt"), "heun", 4, 10)
    second.get("teacher", 1, Path("b.ckpt"), "heun", 4, 10)
    first.get("teacher", 0, Path("a.ckpt"), "heun", 8, 10)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert sorted((r["train_seed"], r["nfe_budget"]) for r in saved) == [(0, 4), (0, 8), (1, 4)]
    # two processes that evaluate the same row: the file keeps one, so no seed counts twice in a table
    second.get("teacher", 0, Path("a.ckpt"), "heun", 16, 10)
    first.get("teacher", 0, Path("a.ckpt"), "heun", 16, 10)  # first read the file before second saved it
    saved = json.loads((tmp_path / "t.json").read_text())
    assert sorted((r["train_seed"], r["nfe_budget"]) for r in saved) == [(0, 4), (0, 8), (0, 16), (1, 4)]


def test_a_seed_process_gets_the_command_less_seeds_and_jobs():
    argv = ["teacher", "--seeds", "0", "1", "2", "--jobs=2", "--n", "500", "--set", "trainer.max_steps=10", "--quick"]
    assert reproduce.without_options(argv, "--seeds", "--jobs") == [
        "teacher", "--n", "500", "--set", "trainer.max_steps=10", "--quick"]


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    run = reproduce.Run("edm_teacher", lambda seed: ["method=edm_teacher"], tmp_path)
    run.dir(3).mkdir(parents=True)
    (run.dir(3) / "DONE").write_text("12 s\n")
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run.train(3) == run.dir(3) and run.seconds(3) == 12


@pytest.mark.slow
def test_the_teacher_table_runs_end_to_end(tmp_path):
    reproduce.main(["teacher", "--quick", "--seeds", "0", "1", "--nfe", "1", "2", "--samplers", "euler", "lazy_ode",
                    "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "teacher.json").read_text())
    assert {(r["train_seed"], r["sampler_name"], r["nfe_budget"]) for r in saved} == {
        (s, m, n) for s in (0, 1) for m in ("euler", "lazy_ode") for n in (1, 2)}
    assert all(len(r["values"]) == 2 for r in saved)  # two disjoint sample sets per row
    text = (tmp_path / "teacher.md").read_text()
    assert "| euler |" in text and "±" in text and "lazy conversion" in text


@pytest.mark.slow
def test_the_kac_table_runs_its_seeds_in_parallel(tmp_path):
    reproduce.main(["kac", "--quick", "--seeds", "0", "1", "--jobs", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kac.json").read_text())
    assert {r["train_seed"] for r in saved} == {0, 1}
    assert {r["label"] for r in saved} == {"teacher", "teacher, no jumps", "staged", "staged, rollouts", "one jump"}
    assert all(0 <= r["dark_fraction"] <= 1 and 0 <= r["noisy_share"] <= 1 for r in saved)
    text = (tmp_path / "kac.md").read_text()
    assert "4-step student (staged, rollouts) within 15%" in text and "denoising jumps" in text
    assert "noisy images, without -> with rollouts" in text


def test_gdd_set_overrides_the_gdd_runs_and_not_their_teachers(tmp_path):
    args = reproduce.parse_args(["gdd", "--out", str(tmp_path), "--set", "trainer.max_steps=8",
                                 "--gdd-set", "callbacks.ema.decay=0.995", "--gdd-levels", "0", "1"])
    teacher, runs = reproduce.teacher_runs(args), reproduce.gdd_runs(args)
    assert "callbacks.ema.decay=0.995" not in teacher.extra and "trainer.max_steps=8" in teacher.extra
    for level, run in runs.items():
        assert run.extra == ["trainer.max_steps=8", "callbacks.ema.decay=0.995"]
        assert f"method.freeze.level={level}" in run.overrides(0)
        assert f"teacher.ckpt={teacher.ckpt(0)}" in run.overrides(0)


def test_a_run_is_not_reused_for_other_overrides(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda command, **_: calls.append(command) or
                        reproduce.subprocess.CompletedProcess(command, 0))
    run = reproduce.Run("gdd_level0", lambda seed: ["method=gdd"], tmp_path, ["callbacks.ema.decay=0.995"])
    run.train(0)
    assert run.train(0) == run.dir(0) and len(calls) == 1  # finished: reused
    other = reproduce.Run("gdd_level0", lambda seed: ["method=gdd"], tmp_path, [])
    with pytest.raises(SystemExit, match="other overrides.*own --out"):
        other.train(0)
    assert len(calls) == 1


@pytest.mark.slow
def test_the_gdd_table_scores_every_checkpoint_with_its_ema_and_its_trained_weights(tmp_path):
    reproduce.main(["gdd", "--quick", "--seeds", "0", "--gdd-levels", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gdd.json").read_text())
    ema = {r["label"].split(" @ ")[1] for r in saved if r["label"].startswith("GDD @")}
    raw = {r["label"].split(" @ ")[1] for r in saved if r["label"].startswith(f"GDD{reproduce.RAW} @")}
    assert ema and ema == raw
    assert all(r["weights"] == "raw" for r in saved if reproduce.RAW in r["label"])
    text = (tmp_path / "gdd.md").read_text()
    assert "| GDD, trained weights |" in text and "GDD's trained weights (not their EMA) do not collapse" in text


def test_the_diffusers_peer_samples_a_gaussian_per_image():
    """diffusers' EDM sde-dpmsolver++ through our grid and the exact denoiser of N(0, 0.5^2): the law, and image i
    depending on its seed only (a generator per image, like k-diffusion's Brownian tree per image)."""
    pytest.importorskip("diffusers")
    from fewstep.samplers import sample
    from fewstep.samplers.noise import SeededNoise

    assert reproduce.DIFFUSERS_PEER in reproduce.register_peers()
    s = 0.5

    def denoiser(x, sigma):
        return x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def draw(seeds, nfe):
        noise = SeededNoise(torch.as_tensor(seeds))
        return sample(denoiser, noise.randn((1, 2, 2)), reproduce.DIFFUSERS_PEER, nfe, generator=noise)

    x = draw(range(2000), 35)
    assert abs(x.std().item() - s) < 0.03 and abs(x.mean().item()) < 0.02  # 8,000 values: std error about 0.004
    assert not torch.equal(draw(range(8), 35), draw(range(1, 9), 35))
    assert torch.equal(draw(range(8), 12)[4:], draw(range(4, 8), 12))


def test_the_students_table_runs_both_ddils_and_the_refresh_variant_at_4_steps_only(tmp_path):
    args = reproduce.parse_args(["students", "--quick", "--out", str(tmp_path)])
    runs = reproduce.student_runs(args)
    assert [n for n in runs if "fresh" in n] == ["ddil_fresh_progressive", "ddil_fresh_dmd2_4"]
    assert len([n for n in runs if "noreflect" in n]) == 5  # every base: fewstep's default DDIL
    assert runs["ddil_noreflect_dmd2_4"][0].overrides(0)[-3:-1] == ["ddil=default", "ddil.reflect=false"]
    assert runs["ddil_dmd2_4"][0].overrides(0)[-3:-1] == ["ddil=default", "ddil.reflect=true"]
    assert [reproduce.student_label(n) for n in ("dmd2_4", "ddil_fresh_dmd2_4", "progressive")] == [
        "dmd2", "ddil_fresh_dmd2", "progressive"]
    with pytest.raises(SystemExit, match="--only dmd2_3: not a students-table run"):
        reproduce.main(["students", "--quick", "--only", "dmd2_3", "--out", str(tmp_path)])


def test_a_row_of_fewer_than_3_seeds_says_so():
    assert str(reproduce.Stat([10.0, 12.0, 14.0], 1.0)) == "12 ± 2"
    assert str(reproduce.Stat([10.0, 12.0], 1.0)) == "11 ± 1.4 (2 seeds)"
    assert str(reproduce.Stat([10.0], 1.0)) == "10 (1 seed)"


def test_the_protocol_names_only_registered_methods():
    from fewstep.methods import METHODS

    assert set(reproduce.BUDGETS) <= set(METHODS)
    assert set(reproduce.QUICK_BUDGETS) <= set(METHODS)


@pytest.mark.slow
def test_the_kac_budget_table_scores_every_candidates_students(tmp_path):
    only = ["400 each, constant lr 2e-4", "200/400/500/700, constant lr 2e-4"]
    reproduce.main(["kac_budget", "--quick", "--seeds", "0", "--only", *only, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kac_budget.json").read_text())
    assert {(r["label"], r["nfe_budget"]) for r in saved} == {("teacher", 8), *((name, k) for name in only for k in (4, 2, 1))}
    assert all(0 <= r["noisy_share"] <= 1 for r in saved)
    text = (tmp_path / "kac_budget.md").read_text()
    assert all(f"| {name} |" in text for name in only) and "one-cycle" not in text
    assert all(f"+method.scheduler.{key}" in " ".join(reproduce.KAC_CANDIDATES["400 each, one-cycle lr 2e-4"])
               for key in ("max_lr", "total_steps"))


@pytest.mark.slow
def test_the_continuous_table_trains_scd_sct_and_meanflow_beside_the_consistency_student(tmp_path):
    reproduce.main(["continuous", "--quick", "--seeds", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "continuous.json").read_text())
    labels = {(r["label"], r["nfe_budget"]) for r in saved}
    for name in ("sCD", "sCT", "MeanFlow", "consistency (LCM form)"):
        assert {(name, 1), (name, 2)} <= labels
    assert ("teacher, edm_sde", 35) in labels
    assert [r["sampler_name"] for r in saved if r["label"] == "MeanFlow"] == ["euler", "euler"]
    text = (tmp_path / "continuous.md").read_text()
    assert "sCD at 1 step(s) better than the LCM-form consistency student" in text and "MeanFlow at 2 step(s)" in text


def test_the_fakescore_students_share_one_budget_the_teachers_and_the_learning_rates(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "FAKESCORE_LR", ["method.optimizer.lr=5e-5", "method.optimizer_critic.lr=5e-5"])
    args = reproduce.parse_args(["fakescore", "--out", str(tmp_path)])
    teacher, runs = reproduce.teacher_runs(args), reproduce.fakescore_runs(args)
    overrides = {label: run.overrides(0) for label, run in runs.items()}
    assert {label: o[0] for label, o in overrides.items()} == {
        "DMD2": "method=dmd2", "SiD": "method=sid", "SiDA": "method=sida", "f-distill, JS": "method=fdistill",
        "f-distill, reverse KL": "method=fdistill"}
    assert "method.divergence=js" in overrides["f-distill, JS"]
    assert "method.divergence=reverse_kl" in overrides["f-distill, reverse KL"]
    assert runs["DMD2"].name != reproduce.student_runs(args)["dmd2_1"][0].name  # its own run: checkpoints every 100 steps
    for o in overrides.values():
        assert [x for x in o if x.startswith(("trainer.", "callbacks."))] == [
            "trainer.max_steps=400", "callbacks.ema.decay=0.99", "trainer.val_check_interval=100"]
        assert f"teacher.ckpt={teacher.ckpt(0)}" in o
        assert o[-2:] == ["method.optimizer.lr=5e-5", "method.optimizer_critic.lr=5e-5"]
    quick = reproduce.fakescore_runs(reproduce.parse_args(["fakescore", "--quick", "--out", str(tmp_path)]))
    assert not any(x.startswith("trainer.") for run in quick.values() for x in run.overrides(0))  # QUICK's steps


def test_sid_improves_fast_when_half_its_fall_comes_in_its_first_interval():
    def curve(*means):
        return {100 * (i + 1): reproduce.Stat([m - 0.5, m, m + 0.5], 0.5) for i, m in enumerate(means)}

    assert reproduce.fast_start(curve(100, 40, 25, 20))[1] == "met"  # exponential
    assert reproduce.fast_start(curve(100, 80, 60, 40))[1] == "missed"  # linear: a third of the fall by the second
    assert reproduce.fast_start(curve(100, 100.2, 99.8, 100))[1] == "within noise"  # no fall
    assert reproduce.fast_start(curve(40, 60, 80, 100))[1] == "missed"  # worse
    assert reproduce.fast_start(curve(100, 40))[1] == "no verdict (fewer than 3 checkpoints)"


@pytest.mark.slow
def test_the_fakescore_table_scores_each_students_checkpoints_beside_gdd_and_the_teacher(tmp_path):
    gdd = [{"label": f"GDD @ {step}", "train_seed": 0, "sampler_name": "euler", "nfe_budget": 1, "n": 16, "value": value,
            "values": [value, value + 1], "ckpt": str(tmp_path / "gone" / f"step_{step}.ckpt")}
           for step, value in ((500, 90.0), (1000, 60.0))]
    (tmp_path / "gdd.json").write_text(json.dumps(gdd))
    reproduce.main(["fakescore", "--quick", "--seeds", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "fakescore.json").read_text())
    assert {(r["label"], r["sampler_name"], r["nfe_budget"]) for r in saved} == {
        *((f"{label} @ 2", "consistency", 1) for label in reproduce.FAKESCORE_METHODS), ("teacher", "edm_sde", 35)}
    text = (tmp_path / "fakescore.md").read_text()
    for label in (*reproduce.FAKESCORE_METHODS, "GDD (gdd table)", "teacher, no teacher table (edm_sde, 35 NFE)"):
        assert f"| {label} |" in text
    for claim in ("| SiD improves fast in its first images |", "| SiDA at one step at or below the teacher's best sampler",
                  "| f-distill with JS at or below f-distill with reverse KL", "| SiD at or below DMD2 at equal training images"):
        assert claim in text
    assert "no verdict (fewer than 3 checkpoints)" in text  # one checkpoint per quick run
    assert (tmp_path / "fakescore.png").is_file()


def test_a_cell_the_table_evaluates_itself_is_a_fewstep_sampler_chosen_over_every_seed(tmp_path):
    import types

    def row(seed, sampler, nfe, value):
        return {"label": "teacher", "train_seed": seed, "sampler_name": sampler, "sampler": sampler, "nfe_budget": nfe,
                "nfe": nfe, "values": [value, value], "dark_fraction": 0.1}

    table = [row(0, "hf_edm_sde_dpmpp", 16, 3.0), row(1, "hf_edm_sde_dpmpp", 16, 9.0),  # a peer, best for seed 0
             row(0, "edm_sde", 35, 4.0), row(1, "edm_sde", 35, 4.0), row(0, "heun", 35, 5.0), row(1, "heun", 35, 3.5)]
    (tmp_path / "teacher.json").write_text(json.dumps(table))
    for seeds in ([0], [1], [0, 1]):  # each seed's process (--jobs) and the parent
        args = types.SimpleNamespace(out=tmp_path, seeds=seeds)
        cell = reproduce.best_edm_teacher(args, evaluable=True)
        assert (cell.sampler, cell.nfe) == ("edm_sde", 35)  # 4.0 over both seeds; heun's 4.25; the peer is no choice
    assert reproduce.best_edm_teacher(types.SimpleNamespace(out=tmp_path, seeds=[0])).sampler == "hf_edm_sde_dpmpp"


def test_the_phema_runs_track_post_hoc_emas_beside_their_fixed_ones(tmp_path):
    args = reproduce.parse_args(["phema", "--out", str(tmp_path), "--gdd-set", "method.r1_gamma=1e-2"])
    teacher, runs = reproduce.teacher_runs(args), reproduce.phema_runs(args)
    assert runs["teacher"].overrides(0) == ["method=edm_teacher", "trainer.max_steps=4000", "callbacks=phema",
                                            "callbacks.phema.snapshot_every=250"]  # 16 snapshots, the teacher's budget
    gdd = runs["GDD"].overrides(0)
    assert gdd[:3] == ["method=gdd", "trainer.max_steps=4000", "trainer.val_check_interval=500"]
    assert f"teacher.ckpt={teacher.ckpt(0)}" in gdd and "method.freeze.level=0" in gdd
    assert gdd[-3:] == ["callbacks=phema", "callbacks.phema.snapshot_every=250", "callbacks.ema.decay=0.995"]
    assert runs["GDD"].extra == ["method.r1_gamma=1e-2"] and runs["teacher"].extra == []
    assert reproduce.gdd_run(args, 0).overrides(0) == gdd[:-3]  # the gdd table's GDD, less the tracking
    quick = reproduce.phema_runs(reproduce.parse_args(["phema", "--quick", "--out", str(tmp_path)]))
    assert all("callbacks.phema.snapshot_every=1" in run.overrides(0) for run in quick.values())
    with pytest.raises(SystemExit, match="leave callbacks.ema.decay out of --gdd-set"):
        reproduce.main(["phema", "--gdd-set", "callbacks.ema.decay=0.99", "--out", str(tmp_path)])


def test_a_row_is_reused_only_for_the_same_guide_guidance_and_weights(tmp_path, monkeypatch):
    calls = []

    def fake(ckpt, sampler, nfe, n, out, options=None, weights="ema", **guidance):
        calls.append((weights, guidance))
        return {"value": 1.0, "values": [1.0, 2.0], "guide": "evaluate's own", "guidance": -1.0}

    monkeypatch.setattr(reproduce, "evaluate_row", fake)
    old = {"label": "teacher", "train_seed": 0, "sampler_name": "heun", "nfe_budget": 16, "n": 10, "value": 3.0, "guidance": 0.0}
    (tmp_path / "t.json").write_text(json.dumps([old]))  # saved before rows recorded their weights and guide
    table = reproduce.Rows(tmp_path / "t.json")
    assert table.get("teacher", 0, Path("a.ckpt"), "heun", 16, 10)["value"] == 3.0 and not calls
    early, earlier = tmp_path / "step_1000.ckpt", tmp_path / "step_500.ckpt"
    for guide, w, interval in ((early, 0.5, None), (early, 0.5, None), (early, 1.0, None), (earlier, 0.5, None),
                               (early, 0.5, [0.3, 5.0]), (early, 0.5, [0.3, 5.0])):
        row = table.get("W", 0, Path("a.ckpt"), "heun", 16, 10, guide=guide, guidance=w, guidance_interval=interval)
        assert (row["guide"], row["guidance"], row["guidance_interval"]) == (str(guide.resolve()), w, interval)
    table.get("teacher", 0, Path("a.ckpt"), "heun", 16, 10, weights="raw")
    assert calls == [("ema", {"guide": str(early.resolve()), "guidance": 0.5}),
                     ("ema", {"guide": str(early.resolve()), "guidance": 1.0}),
                     ("ema", {"guide": str(earlier.resolve()), "guidance": 0.5}),
                     ("ema", {"guide": str(early.resolve()), "guidance": 0.5, "guidance_interval": [0.3, 5.0]}),
                     ("raw", {})]
    again = reproduce.Rows(tmp_path / "t.json")  # a resumed table finds every one of them
    again.get("W", 0, Path("a.ckpt"), "heun", 16, 10, guide=earlier, guidance=0.5)
    again.get("W", 0, Path("a.ckpt"), "heun", 16, 10, guide=early, guidance=0.5, guidance_interval=(0.3, 5))
    assert len(calls) == 5 and len(json.loads((tmp_path / "t.json").read_text())) == 6


def test_the_phemas_default_ema_gdd_row_comes_from_the_gdd_tables_run_of_the_same_settings(tmp_path, monkeypatch):
    args = reproduce.parse_args(["phema", "--seeds", "0", "--n", "10", "--out", str(tmp_path)])
    run = reproduce.gdd_run(args, 0)
    gdd = [{"label": "GDD @ 4000", "train_seed": 0, "sampler_name": "euler", "nfe_budget": 1, "n": 10, "value": 4.6,
            "values": [4.6, 4.7], "guidance": 0.0, "ckpt": str(run.dir(0) / "checkpoints" / "step_0004000.ckpt")}]
    (tmp_path / "gdd.json").write_text(json.dumps(gdd))
    (tmp_path / "gdd.md").write_text(f"<!-- python tools/reproduce.py gdd --seeds 0 1 2{reproduce.settings(args)}: 5 min -->\n")
    monkeypatch.setattr(reproduce.Run, "train", lambda self, seed: pytest.fail(f"trained {self.name}"))
    rows = reproduce.Rows(tmp_path / "phema.json", [0])
    reproduce.default_ema_gdd(args, rows, 0, 4000)
    (row,) = rows.select("GDD, fixed EMA 0.999")
    assert row["values"] == [4.6, 4.7] and row["copied_from"] == str(tmp_path / "gdd.json")
    # the gdd table ran with other GDD settings at this --out: its rows are not this run's
    (tmp_path / "gdd.md").write_text("<!-- python tools/reproduce.py gdd --seeds 0 --n 10 --gdd-set method.r1_gamma=1e-2: 5 min -->\n")
    monkeypatch.setattr(reproduce.Run, "train", lambda self, seed: (_ for _ in ()).throw(RuntimeError(f"trains {self.name}")))
    with pytest.raises(RuntimeError, match="trains gdd_level0"):
        reproduce.default_ema_gdd(args, reproduce.Rows(tmp_path / "other.json"), 0, 4000)


def fake_run(run: Path, steps: list[int]) -> None:
    (run / "checkpoints").mkdir(parents=True)
    for step in steps:
        (run / "checkpoints" / f"step_{step:07d}.ckpt").write_text("")
    (run / "checkpoints" / "last.ckpt").symlink_to(f"step_{max(steps):07d}.ckpt")
    (run / "DONE").write_text("1 s\n")


def test_the_guide_is_the_kept_checkpoint_nearest_the_share_of_the_steps(tmp_path):
    fake_run(tmp_path / "run", [1000, 2000, 3000, 4000])
    assert reproduce.guide_checkpoint(tmp_path / "run", 0.25) == (1000, tmp_path / "run/checkpoints/step_0001000.ckpt")
    assert reproduce.guide_checkpoint(tmp_path / "run", 0.6)[0] == 2000
    assert reproduce.guide_checkpoint(tmp_path / "run", 1.0)[0] == 3000  # never the model itself
    fake_run(tmp_path / "one", [2])
    with pytest.raises(SystemExit, match="no checkpoint before its last"):
        reproduce.guide_checkpoint(tmp_path / "one", 0.25)
    assert reproduce.guide_checkpoint(tmp_path / "one", 0.25, quick=True)[0] == 2  # a smoke run guides by itself


def test_the_autoguidance_table_guides_the_teacher_by_its_quarter_checkpoint_against_the_teacher_tables_rows(
        tmp_path, monkeypatch):
    args = reproduce.parse_args(["autoguidance", "--seeds", "0", "1", "--n", "10", "--out", str(tmp_path)])
    teacher = reproduce.teacher_runs(args)
    for seed in (0, 1):
        fake_run(teacher.dir(seed), [1000, 2000, 3000, 4000])
    unguided = [{"label": "teacher", "train_seed": seed, "sampler_name": sampler, "nfe_budget": nfe, "n": 10,
                 "value": 5.0 + seed, "values": [5.0 + seed, 5.1 + seed], "guidance": 0.0,
                 "ckpt": str(teacher.dir(seed) / "checkpoints" / "step_0004000.ckpt")}
                for seed in (0, 1) for sampler in ("heun", "edm_sde") for nfe in (16, 35)]
    (tmp_path / "teacher.json").write_text(json.dumps(unguided))
    calls = []

    def fake(ckpt, sampler, nfe, n, out, options=None, weights="ema", **guidance):
        calls.append((Path(ckpt).name, sampler, nfe, guidance["guidance"], Path(guidance["guide"]).name))
        value = 5.0 - guidance["guidance"] if sampler == "heun" else 5.0 + guidance["guidance"]  # heun improves
        return {"value": value, "values": [value, value + 0.1]}

    monkeypatch.setattr(reproduce, "evaluate_row", fake)
    lines = reproduce.table_autoguidance(args, reproduce.Rows(tmp_path / "autoguidance.json", [0, 1]))
    assert sorted(calls) == sorted(("last.ckpt", s, nfe, w, "step_0001000.ckpt") for _ in (0, 1)
                                   for s in ("heun", "edm_sde") for nfe in (16, 35) for w in reproduce.AUTOGUIDANCE_W)
    text = "\n".join(lines)
    two = "(2 seeds)"
    assert f"| heun | 5.55 ± 0.71 {two} | 4.8 ± 0 {two} | 4.55 ± 0 {two} | 4.05 ± 0 {two} | 3.05 ± 0 {two} |" in text  # W = 0: copied
    assert "own checkpoint at step 1000" in text
    assert (f"| autoguidance with an earlier checkpoint improves fid_domain at 35 NFE (heun) | best W = 2: 3.05 ± 0 {two} vs "
            f"W = 0: 5.55 ± 0.71 {two} | met |") in text
    assert f"at 16 NFE (edm_sde) | best W = 0.25: 5.3 ± 0 {two} vs W = 0: 5.55 ± 0.71 {two} | within noise |" in text
    assert {r["label"] for r in json.loads((tmp_path / "autoguidance.json").read_text()) if "copied_from" in r} == {"W = 0"}
    assert (tmp_path / "autoguidance.png").is_file()


@pytest.mark.slow
def test_the_phema_table_scores_each_reconstruction_beside_the_fixed_emas(tmp_path):
    reproduce.main(["phema", "--quick", "--seeds", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "phema.json").read_text())
    sigma_rels = [f"sigma_rel {s:g}" for s in reproduce.QUICK_PHEMA_SIGMA_REL]
    assert {r["label"] for r in saved} == {
        *(f"{model}, {what}" for model in ("teacher", "GDD") for what in (*sigma_rels, "trained weights")),
        "teacher, fixed EMA 0.999", "GDD, fixed EMA 0.995", "GDD, fixed EMA 0.999"}
    for r in saved:
        if "sigma_rel" in r["label"]:
            assert Path(r["ckpt"]).parent.name == "reconstructed" and r["ckpt"].endswith(f"sigma_rel_{r['label'].split()[-1]}.ckpt")
    assert {r["weights"] for r in saved if "trained weights" in r["label"]} == {"raw"}
    assert {(r["sampler_name"], r["nfe_budget"]) for r in saved if r["label"].startswith("GDD")} == {("euler", 1)}
    text = (tmp_path / "phema.md").read_text()
    assert "| sigma_rel 0.1 (gamma 6.94) |" in text and "| fixed EMA 0.995 |" in text and "| trained weights |" in text
    for model in ("teacher", "GDD"):
        assert f"| {model}: the best reconstructed sigma_rel matches or beats the best fixed decay" in text
    assert (tmp_path / "phema.png").is_file()


@pytest.mark.slow
def test_the_autoguidance_table_guides_the_teacher_by_an_earlier_checkpoint(tmp_path):
    reproduce.main(["autoguidance", "--quick", "--seeds", "0", "--set", "trainer.max_steps=4", "--set",
                    "trainer.val_check_interval=1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "autoguidance.json").read_text())
    guide = str((tmp_path / "runs/edm_teacher/seed0/checkpoints/step_0000001.ckpt").resolve())
    assert {(r["label"], r["sampler_name"], r["nfe_budget"], r["guide"], r["guidance"]) for r in saved} == {
        *(("W = 0", s, 2, None, 0.0) for s in reproduce.AUTOGUIDANCE_SAMPLERS),
        *(("W = 1, guide @ 1", s, 2, guide, 1.0) for s in reproduce.AUTOGUIDANCE_SAMPLERS)}
    text = (tmp_path / "autoguidance.md").read_text()
    assert "| heun |" in text and "| edm_sde |" in text and "own checkpoint at step 1" in text
    for sampler in reproduce.AUTOGUIDANCE_SAMPLERS:
        assert f"| autoguidance with an earlier checkpoint improves fid_domain at 2 NFE ({sampler}) | best W = 1:" in text
    assert (tmp_path / "autoguidance.png").is_file()
