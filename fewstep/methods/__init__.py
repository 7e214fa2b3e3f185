"""One LightningModule per method. METHODS maps each config name to its class and paper."""

from fewstep.methods.base import GenerativeMethod
from fewstep.methods.edm_teacher import EDMTeacher
from fewstep.methods.flow_teacher import FlowTeacher

METHODS = {
    "edm_teacher": (EDMTeacher, "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022"),
    "flow_teacher": (FlowTeacher, "Lipman et al., Flow Matching for Generative Modeling, 2023"),
}

__all__ = ["METHODS", "GenerativeMethod", "EDMTeacher", "FlowTeacher"]
