"""Data modules: image data sets and Gaussian mixtures with an exact denoiser."""

from fewstep.data.edm_zip import EDMZip
from fewstep.data.gaussian import Gaussian
from fewstep.data.gmm import GaussianMixture, GMMDataModule
from fewstep.data.images import CIFAR10, Digits, FashionMNIST, ImageDataModule, ImageFolder, MNIST5k

__all__ = [
    "ImageDataModule",
    "MNIST5k",
    "Digits",
    "FashionMNIST",
    "CIFAR10",
    "ImageFolder",
    "EDMZip",
    "Gaussian",
    "GaussianMixture",
    "GMMDataModule",
]
