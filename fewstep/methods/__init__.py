"""One LightningModule per method. METHODS maps each config name to its class and paper; it is also the list of
classes a checkpoint may name (fewstep.checkpoints.method_class). DDIL (Garrepalli et al., DDIL: Diversity
Enhancing Diffusion Distillation with Imitation Learning, arXiv 2410.11971) is not a method but a switch on any
EDM-space student (ddil=default; fewstep.methods.student)."""

from fewstep.methods.base import GenerativeMethod
from fewstep.methods.consistency import Consistency
from fewstep.methods.dmd2 import DMD2
from fewstep.methods.edm_teacher import EDMTeacher
from fewstep.methods.flow_teacher import FlowTeacher
from fewstep.methods.gdd import GDD
from fewstep.methods.kac_endpoint import KacEndpoint
from fewstep.methods.kac_teacher import KacTeacher
from fewstep.methods.noise import BatchNoise
from fewstep.methods.progressive import Progressive

METHODS = {
    "edm_teacher": (EDMTeacher, "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022"),
    "flow_teacher": (FlowTeacher, "Lipman et al., Flow Matching for Generative Modeling, 2023"),
    "gdd": (GDD, "Zheng & Yang, Diffusion Models Are Innate One-Step Generators (GDD), arXiv 2405.20750"),
    "kac_teacher": (KacTeacher, "Duong et al., Telegrapher's Generative Model via Kac Flows, arXiv 2506.20641"),
    "kac_endpoint": (KacEndpoint, "Han et al., DistillKac (endpoint distillation of Kac flows), arXiv 2509.21513"),
    "progressive": (Progressive, "Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, 2022"),
    "consistency": (Consistency, "Song et al., Consistency Models, 2023; Luo et al., Latent Consistency Models, arXiv 2310.04378"),
    "dmd2": (DMD2, "Yin et al., Improved Distribution Matching Distillation (DMD2), arXiv 2405.14867"),
}

__all__ = [
    "METHODS", "BatchNoise", "GenerativeMethod", "Consistency", "DMD2", "EDMTeacher", "FlowTeacher", "GDD", "KacEndpoint", "KacTeacher",
    "Progressive",
]
