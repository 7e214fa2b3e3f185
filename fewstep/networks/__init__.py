"""Network architectures, their preconditioning, and the conditioning embeddings."""

from fewstep.networks.mlp import MLP
from fewstep.networks.preconditioning import PreconditionedDenoiser, edm_coefficients, edm_denoise
from fewstep.networks.unet import UNet

__all__ = ["MLP", "UNet", "PreconditionedDenoiser", "edm_coefficients", "edm_denoise"]
