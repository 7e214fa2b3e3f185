"""Forward-mode derivatives of a network: (f(p), J_f(p) v) for the continuous-time methods (sCM, MeanFlow).

``jvp(fn, primals, tangents)`` is ``torch.func.jvp``: one pass gives the output and its directional derivative, the
output keeps its graph to the parameters (the loss backpropagates through it) and a dropout mask is the same for both.
``method="finite_difference"`` is the fallback for a network or kernel without forward-mode rules: the central
difference (f(p + h v) - f(p - h v)) / 2h, each pass from the same random state, so dropout draws one mask.

Precision: the JVP runs with autocast off, in the primals' dtype (float32 in training), output and tangent alike:
a tangent in bfloat16 loses the small differences it is made of. Under bf16 autocast it stays finite and exact to
float32; the rest of the step keeps autocast.

Attention: torch's fused scaled-dot-product kernels (flash, memory-efficient; on CPU too) have no forward-mode rule.
A call that meets one runs again on the math kernel, and every later call on that device type goes there at once;
the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("forward", "finite_difference")
_MATH_ONLY: set[str] = set()  # device types whose fused attention kernels lacked a forward-mode rule


def jvp(
    fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
    method: str = "forward", step: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), the derivative of fn at primals along tangents); the second is detached from the graph.

    ``method``: forward (torch.func.jvp) or finite_difference (central, step ``step`` along the tangents).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown jvp method '{method}': use one of {', '.join(METHODS)}")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents) or any(p.shape != t.shape for p, t in zip(primals, tangents)):
        raise ValueError("jvp: give one tangent of each primal's shape")
    device = primals[0].device.type
    with torch.autocast(device_type=device, enabled=False):
        if method == "finite_difference":
            return _central_difference(fn, primals, tangents, step)
        if device in _MATH_ONLY:
            with sdpa_kernel(SDPBackend.MATH):
                out, tangent = torch.func.jvp(fn, primals, tangents)
            return out, tangent.detach()
        try:
            out, tangent = torch.func.jvp(fn, primals, tangents)
        except (NotImplementedError, RuntimeError) as error:
            if "forward AD" not in str(error) and "forward-mode" not in str(error):
                raise
            _MATH_ONLY.add(device)
            log.warning("jvp: a fused attention kernel on %s has no forward-mode rule; attention in JVPs on %s uses "
                        "the math kernel from now on", device, device)
            with sdpa_kernel(SDPBackend.MATH):
                out, tangent = torch.func.jvp(fn, primals, tangents)
    return out, tangent.detach()


def _central_difference(fn, primals, tangents, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    devices = sorted({p.device for p in primals if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:  # every pass draws what the first drew (one dropout mask)
            torch.set_rng_state(state[0])
            for d, s in zip(devices, state[1]):
                torch.cuda.set_rng_state(s, d)

        reset()
        out = fn(*primals)
        with torch.no_grad():
            reset()
            plus = fn(*(p + step * t for p, t in zip(primals, tangents)))
            reset()
            minus = fn(*(p - step * t for p, t in zip(primals, tangents)))
    return out, (plus - minus) / (2 * step)
