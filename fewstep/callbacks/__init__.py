"""Lightning callbacks: sample grids at every validation, FID against NFE every few, and plain progress
lines where stdout is not a terminal."""

from fewstep.callbacks.progress import TextProgress, auto_progress_bar
from fewstep.callbacks.sample_grid import SampleGrid
from fewstep.callbacks.sampler_benchmark import SamplerBenchmark

__all__ = ["SampleGrid", "SamplerBenchmark", "TextProgress", "auto_progress_bar"]
