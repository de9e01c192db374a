"""The MoE layer in four parts: router, placement, dispatch/experts/combine, load accounting."""

from moeserve.model.moe.experts import ExpertBackend, get_expert_backend, register_expert_backend
from moeserve.model.moe.layer import SparseMoE
from moeserve.model.moe.load import ExpertLoad, LoadRecorder
from moeserve.model.moe.placement import ExpertPlacement, SlotLayout
from moeserve.model.moe.router import Router, Routing

__all__ = [
    "ExpertBackend",
    "ExpertLoad",
    "ExpertPlacement",
    "LoadRecorder",
    "Router",
    "Routing",
    "SlotLayout",
    "SparseMoE",
    "get_expert_backend",
    "register_expert_backend",
]
