"""Learning-rate schedules that torch does not have, by optimiser step (``method.scheduler`` names them exactly).

``InverseSqrtLR`` is EDM2's (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
eq. 17; NVlabs/edm2 ``learning_rate_schedule``): a linear ramp-up, then constant, then ~ 1 / sqrt(t) after a reference
step. EDM2 counts in images: its ``ref_batches`` is already in optimiser steps (it divides the image count by
ref_batches x batch), its ``rampup_Mimg`` ramps over rampup_Mimg x 1e6 images, i.e. rampup_Mimg x 1e6 / batch steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fewstep.errors import ConfigError


class InverseSqrtLR(LRScheduler):
    """lr(t) = base_lr / sqrt(max(t / ref_steps, 1)) x min(t / rampup_steps, 1) at optimiser step t (from 0).

    ``ref_steps`` = 0 leaves out the decay, ``rampup_steps`` = 0 the ramp-up (as EDM2's ref_batches, rampup_Mimg = 0);
    both may be fractional (EDM2's 10 Mimg ramp-up at batch 2048 is 4882.8125 steps). A closed form of t alone: its
    state (the step, ``base_lrs`` and these two) is the scheduler's state_dict, so a resumed run continues the curve.
    """

    def __init__(self, optimizer: Optimizer, ref_steps: float, rampup_steps: float = 0.0, last_epoch: int = -1):
        for name, value in (("ref_steps", ref_steps), ("rampup_steps", rampup_steps)):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"method.scheduler.{name}={value}: use a finite number of optimiser steps >= 0 "
                                  f"(0 leaves out the {'decay' if name == 'ref_steps' else 'ramp-up'})")
        self.ref_steps, self.rampup_steps = float(ref_steps), float(rampup_steps)
        super().__init__(optimizer, last_epoch)

    def lr(self, base_lr: float, step: int) -> float:
        """lr(step), in EDM2's order of operations (its values to float rounding)."""
        lr = base_lr
        if self.ref_steps > 0:
            lr /= math.sqrt(max(step / self.ref_steps, 1.0))
        if self.rampup_steps > 0:
            lr *= min(step / self.rampup_steps, 1.0)
        return lr

    def get_lr(self) -> list[float]:
        return [self.lr(base_lr, self.last_epoch) for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr
