"""SamplerBenchmark: FID against NFE of the EMA model during training, logged, checkpointed and resumable."""

import json
import math
import warnings

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fewstep.callbacks import SamplerBenchmark
from fewstep.errors import ConfigError
from fewstep.train import train

from helpers import TINY

# digits (8x8) with a tiny UNet, 2 validations; the benchmark scores 2 samplers x 2 NFE budgets each time
BENCH = [
    "data=digits", *TINY, "callbacks=benchmark", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "callbacks.sampler_benchmark.samplers=[euler,heun]", "callbacks.sampler_benchmark.nfe=[1,3]",
    "callbacks.sampler_benchmark.n=48", "callbacks.sampler_benchmark.grid_images=16",
    "callbacks.sampler_benchmark.metric=fid_domain", "callbacks.sampler_benchmark.every_n_validations=1",
]


def bench_cfg(compose_cfg, tmp_path, *extra):
    return compose_cfg("train", [*BENCH, f"callbacks.sampler_benchmark.cache_dir={tmp_path}/cache", *extra])


def rows_of(tmp_path):
    (path,) = tmp_path.rglob("benchmark/results.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_benchmark_logs_fid_nfe_and_speed_per_setting(compose_cfg, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FID from n=")
        train(bench_cfg(compose_cfg, tmp_path))
    rows = rows_of(tmp_path)
    assert len(rows) == 2 * 2 * 2  # validations x samplers x NFE budgets
    assert [row["step"] for row in rows] == [2] * 4 + [4] * 4
    for row in rows:
        assert row["metric"] == "fid_domain" and math.isfinite(row["value"]) and row["value"] >= 0
        assert 1 <= row["nfe"] <= row["nfe_budget"] and row["images_per_second"] > 0 and row["n_real"] == 48
    heun = {row["nfe_budget"]: row["nfe"] for row in rows if row["sampler"] == "heun"}
    assert heun == {1: 1, 3: 3}  # heun: NFE = 2 steps - 1, counted
    # fixed seeds: at a given step two samplers that coincide (1 NFE: one Euler step) give the same score
    first = {(row["sampler"], row["nfe_budget"]): row["value"] for row in rows[:4]}
    assert first[("euler", 1)] == pytest.approx(first[("heun", 1)], rel=1e-6)

    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = accumulator.Tags()["scalars"], accumulator.Tags()["images"]
    for tag in ["benchmark/fid_domain/heun_nfe3", "benchmark/nfe/euler_nfe1", "benchmark/images_per_second/heun_nfe1"]:
        assert tag in scalars
        assert [event.step for event in accumulator.Scalars(tag)] == [2, 4]
    assert {"benchmark/heun_nfe3", "benchmark/euler_nfe1", "benchmark/fid_domain_vs_nfe"} <= set(images)
    assert len(list(tmp_path.rglob("benchmark/fid_domain_vs_nfe_step*.png"))) == 2


def test_benchmark_every_k_validations_and_resume_from_checkpoint(compose_cfg, tmp_path):
    checkpoints = tmp_path / "ckpt"
    save = [
        "trainer.enable_checkpointing=true", f"+callbacks.model_checkpoint.dirpath={checkpoints}",
        "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.model_checkpoint.save_last=true", "callbacks.sampler_benchmark.every_n_validations=2",
        "callbacks.sampler_benchmark.samplers=[euler]", "callbacks.sampler_benchmark.nfe=[2]",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FID from n=")
        train(bench_cfg(compose_cfg, tmp_path, *save))
        assert [row["step"] for row in rows_of(tmp_path)] == [4]  # validations at steps 2 and 4, scored at the 2nd

        checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False, map_location="cpu")
        (key,) = [k for k in checkpoint["callbacks"] if k.startswith("SamplerBenchmark")]
        state = checkpoint["callbacks"][key]
        assert state["validations"] == 2 and [row["step"] for row in state["rows"]] == [4]
        # the feature network stays out of the checkpoint: only the method's own weights are in it
        assert not any("extractor" in name or "classifier" in name for name in checkpoint["state_dict"])

        resumed = tmp_path / "resumed"
        cfg = compose_cfg("train", [
            *BENCH, f"callbacks.sampler_benchmark.cache_dir={tmp_path}/cache", *save, "trainer.max_steps=8",
            f"ckpt_path={checkpoints / 'last.ckpt'}", f"paths.output_dir={resumed}",
        ])
        train(cfg)
    resumed_checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False, map_location="cpu")
    state = resumed_checkpoint["callbacks"][key]
    # validations 3 and 4 (steps 6 and 8) continue the count: the 4th is scored, and the history is kept
    assert state["validations"] == 4 and [row["step"] for row in state["rows"]] == [4, 8]


def test_benchmark_refuses_bad_settings_before_training(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="unknown sampler 'nope': choose one of"):
        SamplerBenchmark(samplers=["nope"])
    with pytest.raises(ConfigError, match="nfe=0 is below the minimum"):
        SamplerBenchmark(samplers=["heun"], nfe=[0])
    with pytest.raises(ConfigError, match="unknown metric 'fdi': choose one of fid, fid_domain, kid"):
        SamplerBenchmark(metric="fdi")
    cfg = bench_cfg(compose_cfg, tmp_path, "callbacks.sampler_benchmark.guidance=[0,2]")
    with pytest.raises(ConfigError, match="class-conditional"):
        train(cfg)


def test_benchmark_sampler_options_come_from_the_sampler_group():
    bench = SamplerBenchmark(samplers=["seeds2", {"name": "edm_sde", "s_churn": 10.0}], nfe=[3])
    assert bench.samplers == [{"name": "seeds2", "c2": 0.5}, {"name": "edm_sde", "s_churn": 10.0}]
    assert isinstance(instantiate({"_target_": "fewstep.callbacks.SamplerBenchmark", "samplers": ["euler"]}), SamplerBenchmark)
