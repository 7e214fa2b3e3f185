"""One LightningModule per method. METHODS maps each config name to its class and paper."""

from fewstep.methods.base import GenerativeMethod
from fewstep.methods.edm_teacher import EDMTeacher
from fewstep.methods.flow_teacher import FlowTeacher
from fewstep.methods.gdd import GDD
from fewstep.methods.kac_endpoint import KacEndpoint
from fewstep.methods.kac_teacher import KacTeacher

METHODS = {
    "edm_teacher": (EDMTeacher, "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022"),
    "flow_teacher": (FlowTeacher, "Lipman et al., Flow Matching for Generative Modeling, 2023"),
    "gdd": (GDD, "Zheng & Yang, Diffusion Models Are Innate One-Step Generators (GDD), arXiv 2405.20750"),
    "kac_teacher": (KacTeacher, "Duong et al., Telegrapher's Generative Model via Kac Flows, arXiv 2506.20641"),
    "kac_endpoint": (KacEndpoint, "Han et al., DistillKac (endpoint distillation of Kac flows), arXiv 2509.21513"),
}

__all__ = ["METHODS", "GenerativeMethod", "EDMTeacher", "FlowTeacher", "GDD", "KacEndpoint", "KacTeacher"]
