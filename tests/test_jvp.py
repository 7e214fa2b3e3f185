"""fewstep.jvp: forward-mode derivatives through every fewstep network, against central differences."""

from __future__ import annotations

import logging

import pytest
import torch

from fewstep import jvp as jvp_module
from fewstep.errors import ConfigError
from fewstep.jvp import jvp
from fewstep.networks.edm import DhariwalUNet, SongUNet
from fewstep.networks.mlp import MLP
from fewstep.networks.unet import UNet

NETWORKS = {  # tiny, each with its attention where it has one; dropout on, to check the mask is shared
    "unet": lambda: UNet([1, 8, 8], model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), dropout=0.1),
    "mlp": lambda: MLP([2], width=16, dropout=0.1),
    "songunet": lambda: SongUNet(8, 1, 1, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "dhariwalunet": lambda: DhariwalUNet(8, 1, 1, model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
}


def network(name: str, dtype=torch.float64) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The network with every weight drawn (zero-initialised outputs would make every derivative 0), an input and
    tangents along x and the noise label."""
    torch.manual_seed(0)  # the same draws in float64, then cast: float32 copies of the float64 case
    net = NETWORKS[name]().double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    shape = (3, 2) if name == "mlp" else (3, 1, 8, 8)
    x, c = torch.randn(shape, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    primals, tangents = (x, c), (torch.randn_like(x), torch.ones_like(c))
    return net.to(dtype), tuple(p.to(dtype) for p in primals), tuple(t.to(dtype) for t in tangents)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(NETWORKS))
def test_forward_mode_agrees_with_central_differences_in_float64(name):
    net, primals, tangents = network(name)
    f = lambda x, c: net(x, c, None)  # noqa: E731
    torch.manual_seed(1)
    out, tangent = jvp(f, primals, tangents)
    torch.manual_seed(1)  # the same dropout mask in every pass of both
    out_fd, tangent_fd = jvp(f, primals, tangents, method="finite_difference", step=1e-5)
    assert tangent.norm() > 0
    assert relative(tangent, tangent_fd) < 1e-4
    assert torch.equal(out, out_fd)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_float32_tangents_agree_with_float64_and_the_output_keeps_its_graph(name):
    net64, primals64, tangents64 = network(name)
    net32, primals32, tangents32 = network(name, torch.float32)
    net64.eval(), net32.eval()
    _, exact = jvp(lambda x, c: net64(x, c, None), primals64, tangents64)
    out, tangent = jvp(lambda x, c: net32(x, c, None), primals32, tangents32)
    assert tangent.dtype == torch.float32 and not tangent.requires_grad
    assert relative(tangent.double(), exact) < 1e-4
    out.square().sum().backward()  # the loss backpropagates through the JVP's output
    assert all(p.grad is not None for p in net32.parameters() if p.requires_grad)


def test_under_bf16_autocast_the_jvp_runs_in_float32_and_stays_finite():
    net, primals, tangents = network("unet", torch.float32)
    net.eval()
    _, plain = jvp(lambda x, c: net(x, c, None), primals, tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, tangent = jvp(lambda x, c: net(x, c, None), primals, tangents)
        outside = net(*primals, None)  # autocast holds again after the call
    assert out.dtype == tangent.dtype == torch.float32 and outside.dtype == torch.bfloat16
    assert torch.isfinite(tangent).all() and torch.allclose(tangent, plain)


def test_a_fused_attention_kernel_without_forward_mode_falls_back_to_math_once(monkeypatch, caplog):
    monkeypatch.setattr(jvp_module, "_MATH_ONLY", set())
    q = torch.randn(2, 2, 16, 8)

    def attention(q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    with caplog.at_level(logging.WARNING, logger="fewstep.jvp"):
        first = jvp(attention, (q,), (torch.ones_like(q),))
        second = jvp(attention, (q,), (torch.ones_like(q),))
    math = jvp(attention, (q.double(),), (torch.ones_like(q).double(),), method="finite_difference", step=1e-6)
    assert relative(first[1].double(), math[1]) < 1e-4 and torch.equal(first[1], second[1])
    warned = [r for r in caplog.records if "math kernel" in r.getMessage()]
    # a CPU kernel with a forward-mode rule needs no fallback: then nothing is said
    assert len(warned) == (1 if "cpu" in jvp_module._MATH_ONLY else 0)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="unknown jvp method 'reverse'"):
        jvp(torch.sin, (torch.ones(2),), (torch.ones(2),), method="reverse")
    with pytest.raises(ValueError, match="one tangent of each primal's shape"):
        jvp(torch.sin, (torch.ones(2),), (torch.ones(3),))
