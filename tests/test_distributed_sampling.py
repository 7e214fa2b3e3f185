"""Validation samples split across ranks: each rank draws its shard of global indices, the shards are gathered
in order, and the grids and scores are those of one process."""

import io
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fewstep.generate import generate, generate_across_ranks, rank_shard
from fewstep.images import to_uint8
from fewstep.methods import EDMTeacher

from helpers import REPO, SHAPE, UNET

CLASSES = 3


@pytest.fixture(scope="module")
def conditional_method() -> EDMTeacher:
    """A class-conditional teacher with random weights (zero-initialised layers would make every sample alike)."""
    method = EDMTeacher(net=UNET, data_shape=SHAPE, num_classes=CLASSES, conditional=True).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return method


def one_process() -> SimpleNamespace:
    """What generate_across_ranks reads of a single-process Trainer."""
    return SimpleNamespace(global_rank=0, world_size=1, strategy=SingleDeviceStrategy(torch.device("cpu")))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [1, 9, 10, 64])
def test_rank_shards_are_equal_consecutive_and_cover_every_index(n, world):
    shards = [rank_shard(n, rank, world) for rank in range(world)]
    counts = {count for _, count in shards}
    assert len(counts) == 1  # every rank makes the same network calls
    indices = [i for first, count in shards for i in range(first, first + count)]
    assert indices == list(range(len(indices)))  # consecutive, in rank order
    assert n <= len(indices) < n + world  # everything, and less than one sample of padding per rank


def test_generate_from_an_offset_gives_those_rows_of_the_whole_draw(conditional_method):
    # a stochastic sampler with guidance: the seeds drive the SDE noise too, and the labels the output
    draw = dict(sampler="euler_maruyama", nfe=3, seed=5, guidance=1.5, batch_size=2)
    whole, labels, nfe = generate(conditional_method, 7, **draw)
    offset, count = 2, 4  # batches line up with the whole draw's, so the arithmetic is the same
    part, part_labels, part_nfe = generate(conditional_method, count, offset=offset, **draw)
    assert torch.equal(part, whole[offset : offset + count])
    assert torch.equal(part_labels, labels[offset : offset + count])
    assert torch.equal(part_labels, torch.arange(offset, offset + count) % CLASSES)
    assert part_nfe == nfe
    assert not torch.equal(part, whole[:count])  # the offset matters


def test_generate_across_ranks_in_one_process_is_generate(conditional_method):
    draw = dict(sampler="euler", nfe=2, seed=1, guidance=0.5, batch_size=4)
    n = 6
    whole, _, nfe = generate(conditional_method, n, **draw)
    samples, preview, used = generate_across_ranks(one_process(), conditional_method, n, **draw)
    assert torch.equal(samples, whole) and used == nfe and len(preview) == 0
    images, preview, _ = generate_across_ranks(one_process(), conditional_method, n, uint8=True, preview=n // 2, **draw)
    assert images.dtype == torch.uint8 and torch.equal(images, to_uint8(whole))
    assert torch.equal(preview, whole[: n // 2])
    _, preview, _ = generate_across_ranks(one_process(), conditional_method, n, preview=n + 1, **draw)
    assert torch.equal(preview, whole)  # never more than the n samples


# -- two gloo processes against one --------------------------------------------------------------------------

# Each rank builds the same fixed-weight teacher and draws its shard with a stochastic sampler (per-image SDE noise
# from the counter-based SeededNoise); rank 0 also draws all of them as one process. 8 samples, 4 a batch: the
# ranks' batches are the one process's, so the network's arithmetic is the same and the samples must be equal.
RANK_SCRIPT = """
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import SingleDeviceStrategy

from fewstep.generate import generate_across_ranks
from fewstep.methods import EDMTeacher

rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
torch.manual_seed(0)
method = EDMTeacher(net={unet!r}, data_shape={shape!r}, num_classes={classes}, conditional=True).eval()
with torch.no_grad():
    for p in method.parameters():
        p.add_(0.2 * torch.randn(p.shape))


class Gloo:
    def all_gather(self, part):
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        return torch.stack(parts)


draw = dict(sampler="euler_maruyama", nfe=4, seed=5, guidance=1.5, batch_size=4)
two, _, _ = generate_across_ranks(SimpleNamespace(global_rank=rank, world_size=world, strategy=Gloo()), method, 8, **draw)
if rank == 0:
    single = SimpleNamespace(global_rank=0, world_size=1, strategy=SingleDeviceStrategy(torch.device("cpu")))
    one, _, _ = generate_across_ranks(single, method, 8, **draw)
    torch.save({{"one": one, "two": two}}, out)
dist.destroy_process_group()
""".format(unet=UNET, shape=SHAPE, classes=CLASSES)


@pytest.mark.slow
def test_two_ranks_draw_bit_for_bit_the_stochastic_samples_of_one_process(tmp_path):
    script, store, out = tmp_path / "rank.py", tmp_path / "store", tmp_path / "samples.pt"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", str(store), str(out)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        for rank in ranks:
            _, err = rank.communicate(timeout=TIMEOUT_S)
            assert rank.returncode == 0, err[-3000:]
    finally:
        for rank in ranks:
            rank.kill()
    result = torch.load(out)
    assert result["two"].shape == (8, *SHAPE) and result["two"].std() > 0.1
    assert torch.equal(result["two"], result["one"])  # bit for bit, SDE noise included



# One validation at step 2 with a benchmark and a sample grid. The sample counts are odd, so the second rank
# draws padding; the NFE are high enough that each sample shows its seed (at 2 NFE the barely trained network
# draws nearly the same image from any seed). data.limit leaves the fid_domain classifier enough images to
# mean something (held-out accuracy ~0.9).
GRID_N, BENCH_N, BENCH_NFE = 5, 9, 8
RUN = [
    "data=digits", "model=unet_tiny", "data.limit=600", "data.val_size=16", "trainer.max_steps=2", "seed=3",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks=benchmark", "logger=tensorboard",
    f"callbacks.sample_grid.n={GRID_N}", "callbacks.sample_grid.nfe=9",
    f"callbacks.sampler_benchmark.n={BENCH_N}", "callbacks.sampler_benchmark.samplers=[euler]",
    f"callbacks.sampler_benchmark.nfe=[{BENCH_NFE}]", "callbacks.sampler_benchmark.every_n_validations=1",
    "callbacks.sampler_benchmark.metric=fid_domain",
]
GLOBAL_BATCH = 8
TWO_PROCESSES = [f"data.batch_size={GLOBAL_BATCH // 2}", "trainer.devices=2", "trainer.strategy=ddp"]  # gloo on CPU
TIMEOUT_S = 120  # ~10x a run here: a deadlocked collective fails the test instead of hanging it


def train_run(tmp_path, name: str, *overrides: str):
    run_dir = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "fewstep.train", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def rows_of(run_dir) -> list[dict]:
    (path,) = run_dir.rglob("benchmark/results.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def settings_of(row: dict) -> dict:
    """A benchmark row without what it measured."""
    return {key: value for key, value in row.items() if key not in {"images_per_second", "value"}}


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def tensorboard_images(run_dir) -> dict[str, np.ndarray]:
    (events,) = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0}).Reload()
    return {
        tag: png_pixels(io.BytesIO(event.encoded_image_string))
        for tag in accumulator.Tags()["images"]
        for event in accumulator.Images(tag)
    }


def assert_nearly_the_same_picture(a: np.ndarray, b: np.ndarray) -> None:
    # the weights of the two runs differ by ~1e-5 (the gradient sum's order): a pixel may round the other way
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_two_processes_draw_score_and_picture_what_one_process_does(tmp_path):
    cache = f"callbacks.sampler_benchmark.cache_dir={tmp_path / 'cache'}"  # one fid_domain classifier for both
    one = train_run(tmp_path, "one", *RUN, cache, f"data.batch_size={GLOBAL_BATCH}")
    two = train_run(tmp_path, "two", *RUN, cache, *TWO_PROCESSES)

    (row_one,), (row_two,) = rows_of(one), rows_of(two)  # rank zero alone writes, once per setting
    assert settings_of(row_one) == settings_of(row_two)
    assert row_two["images_per_second"] > 0
    assert math.isfinite(row_one["value"]) and row_one["value"] > 0
    assert row_two["value"] == pytest.approx(row_one["value"], rel=1e-3)

    (grid_one,), (grid_two,) = (list(run.rglob("samples/step_*.png")) for run in (one, two))
    assert grid_one.name == grid_two.name
    assert_nearly_the_same_picture(png_pixels(grid_one), png_pixels(grid_two))

    pictures_one, pictures_two = tensorboard_images(one), tensorboard_images(two)
    assert pictures_one.keys() == pictures_two.keys()
    assert {f"benchmark/euler_nfe{BENCH_NFE}", "benchmark/fid_domain_vs_nfe"} <= pictures_one.keys()
    for tag in pictures_one.keys() - {"benchmark/fid_domain_vs_nfe"}:  # the figure's tick labels print the score
        assert_nearly_the_same_picture(pictures_one[tag], pictures_two[tag])


@pytest.mark.slow
def test_two_processes_benchmark_vector_data_without_pictures(tmp_path):
    vector = [
        "data=gmm", "model=mlp", "model.width=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "callbacks=benchmark", "logger=csv", f"callbacks.sample_grid.n={GRID_N}",
        f"callbacks.sampler_benchmark.n={BENCH_N}", "callbacks.sampler_benchmark.samplers=[euler]",
        f"callbacks.sampler_benchmark.nfe=[{BENCH_NFE}]", "callbacks.sampler_benchmark.every_n_validations=1",
    ]
    run_dir = train_run(tmp_path, "gmm", *vector, *TWO_PROCESSES)
    (row,) = rows_of(run_dir)
    assert row["nfe"] == BENCH_NFE and row["n"] == BENCH_N and row["images_per_second"] > 0  # Euler: NFE = steps
    assert "value" not in row  # no feature network for vectors
    assert not list(run_dir.rglob("*.png"))
