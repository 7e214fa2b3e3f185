"""EDM preconditioning identities (Karras et al. 2022, Appendix B.6)."""

import torch

from fewstep.networks import edm_coefficients, edm_denoise

SIGMAS = torch.logspace(-3, 2, 50, dtype=torch.float64)


def test_effective_training_target_has_unit_variance():
    # With x0 of std sd and x = x0 + sigma n, F's target (x0 - c_skip x) / c_out has unit variance.
    for sd in (0.25, 0.5, 1.0):
        c_skip, c_out, c_in, _ = edm_coefficients(SIGMAS, sd)
        target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
        torch.testing.assert_close(target_var, torch.ones_like(SIGMAS))
        # and the network input c_in x has unit variance
        torch.testing.assert_close(c_in**2 * (sd**2 + SIGMAS**2), torch.ones_like(SIGMAS))


def test_c_skip_minimises_target_scale():
    # c_skip is the minimiser of the effective-target variance, i.e. its derivative in c_skip vanishes.
    sd = 0.5
    c_skip, _, _, _ = edm_coefficients(SIGMAS, sd)
    grad = -2 * (1 - c_skip) * sd**2 + 2 * c_skip * SIGMAS**2
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)


def test_limits_and_c_noise():
    c_skip, c_out, _, c_noise = edm_coefficients(torch.tensor([1e-6, 1e6], dtype=torch.float64), 0.5)
    assert abs(c_skip[0] - 1) < 1e-9 and c_out[0] < 1e-5  # D(x, 0) = x
    assert c_skip[1] < 1e-9 and abs(c_out[1] - 0.5) < 1e-6  # D(x, inf) = sd * F
    torch.testing.assert_close(c_noise, torch.log(torch.tensor([1e-6, 1e6], dtype=torch.float64)) / 4)


def test_edm_denoise_applies_the_coefficients_to_the_network():
    class Recorder(torch.nn.Module):
        def forward(self, x, c_noise, class_labels=None):
            self.seen = (x.clone(), c_noise.clone())
            return torch.ones_like(x)

    net = Recorder()
    x = torch.randn(3, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = edm_denoise(net, x, sigma, None, sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
    torch.testing.assert_close(net.seen[0], c_in[:, None] * x)
    torch.testing.assert_close(net.seen[1], c_noise)
    torch.testing.assert_close(out, c_skip[:, None] * x + c_out[:, None])
