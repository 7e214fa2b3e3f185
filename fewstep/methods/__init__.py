"""One LightningModule per method. METHODS maps each config name (conf/method/<name>.yaml) to its class and paper; it
is also the list of classes a checkpoint may name (fewstep.checkpoints.method_class), to which a program adds its own
with ``register_method``. DDIL (Garrepalli et al., DDIL: Diversity Enhancing Diffusion Distillation with Imitation
Learning, arXiv 2410.11971) is not a method but a switch on any EDM-space student (ddil=default;
fewstep.methods.student)."""

from fewstep.methods.base import GenerativeMethod
from fewstep.methods.consistency import Consistency
from fewstep.methods.dmd2 import DMD2
from fewstep.methods.edm_teacher import EDMTeacher
from fewstep.methods.fdistill import FDistill
from fewstep.methods.flow_teacher import FlowTeacher
from fewstep.methods.gdd import GDD
from fewstep.methods.kac_endpoint import KacEndpoint
from fewstep.methods.kac_teacher import KacTeacher
from fewstep.methods.meanflow import MeanFlow
from fewstep.methods.noise import BatchNoise
from fewstep.methods.progressive import Progressive
from fewstep.methods.scm import SCM
from fewstep.methods.sid import SiD, SiDA

METHODS = {
    "edm_teacher": (EDMTeacher, "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022"),
    "flow_teacher": (FlowTeacher, "Lipman et al., Flow Matching for Generative Modeling, 2023"),
    "gdd": (GDD, "Zheng & Yang, Diffusion Models Are Innate One-Step Generators (GDD), arXiv 2405.20750"),
    "kac_teacher": (KacTeacher, "Duong et al., Telegrapher's Generative Model via Kac Flows, arXiv 2506.20641"),
    "kac_endpoint": (KacEndpoint, "Han et al., DistillKac (endpoint distillation of Kac flows), arXiv 2509.21513"),
    "progressive": (Progressive, "Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, 2022"),
    "consistency": (Consistency, "Song et al., Consistency Models, 2023; Luo et al., Latent Consistency Models, arXiv 2310.04378"),
    "dmd2": (DMD2, "Yin et al., Improved Distribution Matching Distillation (DMD2), arXiv 2405.14867"),
    "sid": (SiD, "Zhou et al., Score identity Distillation (SiD), arXiv 2404.04057"),
    "sida": (SiDA, "Zhou et al., Adversarial Score identity Distillation (SiDA), arXiv 2410.14919"),
    "fdistill": (FDistill, "Xu et al., One-step Diffusion Models with f-Divergence Distribution Matching, arXiv 2502.15681"),
    "meanflow": (MeanFlow, "Geng et al., Mean Flows for One-step Generative Modeling, arXiv 2505.13447"),
    "scm": (SCM, "Lu & Song, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models (sCM), arXiv 2410.11081"),
}


def register_method(name: str, cls: type, paper: str) -> None:
    """Add a method class of your own to METHODS as ``name``, so that its checkpoints load (by the class's exact
    qualified name, once your program has imported it); ``paper`` is what it implements."""
    if not (isinstance(cls, type) and issubclass(cls, GenerativeMethod)):
        raise ValueError(f"register_method({name!r}, {cls!r}): a method is a subclass of fewstep.methods.GenerativeMethod")
    taken = METHODS.get(name, (cls,))[0]
    if taken is not cls:
        raise ValueError(f"the method name {name!r} is {taken.__qualname__}'s: register {cls.__qualname__} under another")
    METHODS[name] = (cls, paper)


__all__ = [
    "METHODS", "BatchNoise", "GenerativeMethod", "Consistency", "DMD2", "EDMTeacher", "FDistill", "FlowTeacher", "GDD",
    "KacEndpoint", "KacTeacher",
    "MeanFlow", "Progressive", "SCM", "SiD", "SiDA", "register_method",
]
