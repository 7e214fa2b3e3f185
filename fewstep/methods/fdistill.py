"""f-distill: one-step distillation by f-divergence distribution matching (Xu et al. 2025, arXiv 2502.15681)."""

from __future__ import annotations

import torch

from fewstep.errors import ConfigError
from fewstep.methods.dmd2 import distribution_matching_grad, distribution_matching_loss
from fewstep.methods.fake_score import FakeScoreDistillation, batch_view
from fewstep.methods.gan import generator_loss as gan_generator_loss

LOG_RATIO_BOUND = 10.0  # |log r| is clamped here: exp(10) keeps forward KL's weights finite in float32

# D_f(p || q) = E_q f(p / q), r = p / q the teacher's (data's) density over the generator's. The generator's gradient
# is E_q[h(r) (s_q - s_p) dx/dtheta] with h(r) = r^2 f''(r); h is written in log r for stability.
DIVERGENCES = {
    # name: (f(r), h(r) from log r)
    "reverse_kl": (lambda r: -torch.log(r), lambda log_r: torch.ones_like(log_r)),
    "forward_kl": (lambda r: r * torch.log(r), lambda log_r: log_r.exp()),
    "js": (lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2), lambda log_r: torch.sigmoid(log_r)),
    "squared_hellinger": (lambda r: (r.sqrt() - 1) ** 2, lambda log_r: (log_r / 2).exp() / 2),
    "jeffreys": (lambda r: (r - 1) * torch.log(r), lambda log_r: log_r.exp() + 1),
    "softened_reverse_kl": (lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda log_r: torch.sigmoid(-log_r)),
    "neyman_chi_squared": (lambda r: (r - 1) ** 2 / r, lambda log_r: 2 * (-log_r).exp()),
}


def check_divergence(name: str) -> None:
    if name not in DIVERGENCES:
        raise ConfigError(f"unknown method.divergence '{name}': choose one of {', '.join(DIVERGENCES)}")


def divergence_weights(divergence: str, log_ratio: torch.Tensor, batch_mean) -> torch.Tensor:
    """h(r) / mean h(r) over the batch (``batch_mean``: the global batch's mean), r = exp(clamped log_ratio)."""
    h = DIVERGENCES[divergence][1](log_ratio.detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    return h / batch_mean(h).clamp(min=1e-12)


class FDistill(FakeScoreDistillation):
    """f-distill (Xu et al. 2025): DMD's distribution matching with each sample's score difference weighted by
    h(r) = r^2 f''(r) of the chosen f-divergence (``divergence``), normalised to mean one over the batch; the
    density ratio r = p_teacher / p_generator at the noised sample is exp of the GAN head's logit on the fake
    denoiser's features (the head's optimum is log r). ``reverse_kl`` (h = 1) is DMD's gradient.
    """

    def __init__(self, *args, divergence: str = "js", **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("divergence")
        check_divergence(divergence)
        if divergence != "reverse_kl" and not self.hparams.critic_gan_weight > 0:
            raise ConfigError(f"method.divergence={divergence} weighs by the density ratio that the GAN head learns: set "
                              "method.critic_gan_weight > 0 (or use divergence=reverse_kl)")

    def generator_loss(self, fake: torch.Tensor, class_labels, rng):
        """L_DM with the f-divergence's weights, plus gan_weight * softplus(-D(G)) on the fake denoiser's head."""
        hp = self.hparams
        noisy, sigma = self.noised(fake, rng)
        logits = self.gan_logits(noisy, sigma, class_labels) if self.gan else None
        with torch.no_grad():
            real = self.teacher_denoise(noisy, sigma, class_labels)
            fake_x0 = self.fake_denoiser(noisy, sigma, class_labels)
            grad = torch.nan_to_num(distribution_matching_grad(fake, real, fake_x0))
            if hp.divergence != "reverse_kl":
                weights = divergence_weights(hp.divergence, logits, self.global_mean)
                grad = grad * batch_view(weights, grad)
        if logits is not None and self._trainer is not None and self.training:
            self.log("train/log_ratio", logits.detach().mean())
        out = {"dm": distribution_matching_loss(fake, grad)}
        out["loss"] = out["dm"]
        if self.gan_term_on(fake):
            out["gan"] = gan_generator_loss(logits, "nonsaturating")
            out["loss"] = out["loss"] + hp.gan_weight * out["gan"]
        return out


__all__ = ["DIVERGENCES", "FDistill", "divergence_weights"]
