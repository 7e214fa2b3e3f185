"""Image grid of samples at fixed seeds, drawn with the EMA weights at every validation."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from fewstep.generate import generate_across_ranks
from fewstep.images import ImageWriteError, image_grid, run_log_dir, save_grid
from fewstep.rundir import warn


class SampleGrid(L.Callback):
    """Logs a grid of ``n`` samples (``sampler`` at ``nfe``) to TensorBoard and as a PNG under the log dir.

    It runs inside the first validation batch, where Lightning's EMAWeightAveraging has swapped
    the EMA weights in, so the grid shows the EMA model. Under DDP or FSDP every rank draws an equal
    share of the samples (``generate_across_ranks``); the shares are gathered in seed order, and rank
    zero logs and saves the grid, which is thus the same on any number of devices.

    A grid that cannot be written (a full disk) is one warning line, the first time, and training goes on: the
    checkpoints are what the run must keep, and their own writes stop the run in one line when they fail.
    """

    def __init__(self, n: int = 64, sampler: dict | str = "heun", nfe: int = 35, seed: int = 0, guidance: float = 0.0):
        # ``sampler`` is a sampler config ({name, **solver options}) or just a solver name.
        options = dict(sampler) if not isinstance(sampler, str) else {"name": sampler}
        self.sampler = options.pop("name")
        self.options = options
        self.n, self.nfe, self.seed, self.guidance = n, nfe, seed, guidance
        self.warned = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        samples, _, _ = generate_across_ranks(
            trainer, pl_module, self.n, self.sampler, self.nfe, self.seed, self.guidance, **self.options
        )
        pl_module.train(was_training)
        if not trainer.is_global_zero or samples.ndim != 4:  # vector data has no picture
            return
        step = trainer.global_step
        try:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"samples/{self.sampler}_nfe{self.nfe}", image_grid(samples), step)
            save_grid(samples, run_log_dir(trainer) / "samples" / f"step_{step:07d}.png")
        except (ImageWriteError, OSError) as error:
            if not self.warned:
                self.warned = True
                if isinstance(error, ImageWriteError):
                    failed = f"could not write the sample grid '{error.path}' ({error.reason})"
                else:
                    failed = f"could not log the sample grid to TensorBoard ({error.strerror or error})"
                warn(f"{failed}: training goes on without it (checkpoints are written as before); later grids that "
                     "fail are skipped silently")
