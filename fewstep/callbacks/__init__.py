"""Lightning callbacks: sample grids (and, later, sampler benchmarks and FID-vs-NFE plots)."""

from fewstep.callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
