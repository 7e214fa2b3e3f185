"""tools/seeds_split.py: a route of two pieces is the sampler itself when both pieces are its own steps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewstep.images import to_uint8
from fewstep.samplers import SOLVERS, SeededNoise, karras_sigmas, sample

TOOL = Path(__file__).resolve().parents[1] / "tools" / "seeds_split.py"
spec = importlib.util.spec_from_file_location("seeds_split", TOOL)
seeds_split = importlib.util.module_from_spec(spec)
sys.modules["seeds_split"] = seeds_split
spec.loader.exec_module(seeds_split)

SHAPE = (1, 4, 4)


def gaussian_method():
    """A stand-in for a trained method: the exact denoiser of N(0.1, 0.5^2) per pixel."""
    mean, s2 = 0.1, 0.25

    def denoiser(x, sigma):
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return mean + (x - mean) * s2 / (s2 + sigma**2)

    return SimpleNamespace(denoiser=denoiser, device=torch.device("cpu"), hparams=SimpleNamespace(data_shape=SHAPE))


@pytest.mark.parametrize("sampler, nfe", [("seeds3", 8), ("seeds2", 9), ("heun", 7)])
def test_a_route_of_the_samplers_own_steps_is_the_sampler(sampler, nfe):
    method = gaussian_method()
    grid = karras_sigmas(SOLVERS[sampler].steps_for_nfe(nfe))
    pieces = seeds_split.pieces(f"{sampler}>{sampler}", grid, 1, "heun", 6)
    images, _ = seeds_split.draw(method, pieces, 12, seed=5, batch_size=5)
    expected = []
    for start in range(0, 12, 5):  # as method.sample_batch does: one SeededNoise gives x_T, then the SDE noise
        noise = SeededNoise(range(5 + start, 5 + min(12, start + 5)))
        expected.append(sample(method.denoiser, noise.randn(SHAPE), sampler, nfe, generator=noise))
    expected = torch.cat(expected)
    assert torch.equal(images, to_uint8(expected))


def test_fine_pieces_cover_each_side_of_the_split_on_their_own_grid():
    grid = karras_sigmas(3)  # 80, 2.52, 0.002, 0
    (first, high), (second, low) = seeds_split.pieces("fine>seeds3", grid, 1, "heun", 6)
    assert first == "heun" and second == "seeds3"
    assert len(high) == 6 and float(high[0]) == 80.0 and float(high[-1]) == pytest.approx(float(grid[1]))
    assert torch.equal(low, grid[1:])
    (_, high), (_, low) = seeds_split.pieces("seeds3>fine", grid, 1, "heun", 6)
    assert torch.equal(high, grid[:2])
    assert len(low) == 7 and float(low[0]) == pytest.approx(float(grid[1])) and float(low[-2]) == pytest.approx(0.002)
    assert float(low[-1]) == 0.0


def test_an_unknown_solver_in_a_route_names_the_choices():
    with pytest.raises(SystemExit, match="unknown solver 'seeds4'.*choose fine or one of"):
        seeds_split.pieces("seeds4>fine", karras_sigmas(3), 1, "heun", 6)
