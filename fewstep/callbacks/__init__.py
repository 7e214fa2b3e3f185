"""Lightning callbacks: sample grids at every validation, FID against NFE every few, plain progress lines where
stdout is not a terminal, and the power-function EMAs of post-hoc EMA."""

from fewstep.callbacks.phema import PowerFunctionEMA
from fewstep.callbacks.progress import TextProgress, auto_progress_bar
from fewstep.callbacks.sample_grid import SampleGrid
from fewstep.callbacks.sampler_benchmark import SamplerBenchmark

__all__ = ["PowerFunctionEMA", "SampleGrid", "SamplerBenchmark", "TextProgress", "auto_progress_bar"]
