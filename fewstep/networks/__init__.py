"""Network architectures, their preconditioning, and the conditioning embeddings."""

from fewstep.networks.mlp import MLP
from fewstep.networks.preconditioning import EDMPrecond, edm_coefficients, edm_denoise
from fewstep.networks.unet import UNet

__all__ = ["MLP", "UNet", "EDMPrecond", "edm_coefficients", "edm_denoise"]
