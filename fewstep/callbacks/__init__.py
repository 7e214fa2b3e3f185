"""Lightning callbacks: sample grids at every validation, and FID against NFE every few."""

from fewstep.callbacks.sample_grid import SampleGrid
from fewstep.callbacks.sampler_benchmark import SamplerBenchmark

__all__ = ["SampleGrid", "SamplerBenchmark"]
