"""The PB core: dendritic units, model conversion, and the controller that runs the phases.

    unit.py         DendriticUnit: a layer + its BatchNorm + D dendrites (structure + forward)
    layers.py       DendriticConv2d and DendriticLinear, the units a model is converted to
    candidate.py    Candidate: the dendrite-phase candidate's weights, statistics and snapshot
    conversion.py   convert(model), count_parameters(model)
    config.py       PBConfig: the controller's validated settings, the one source of defaults
    controller.py   PerforatedBackprop: the neuron / dendrite / done state machine
    history.py      the controller's per-epoch record (CSV, figure)

``pbp_fast.nn`` is this package.
"""
from pbp_fast.core.candidate import Candidate
from pbp_fast.core.config import PBConfig
from pbp_fast.core.controller import Decision, PerforatedBackprop, State, snapshot_state_dict
from pbp_fast.core.conversion import ParameterCount, convert, count_parameters, replace_module
from pbp_fast.core.history import History
from pbp_fast.core.layers import DendriticConv2d, DendriticLinear
from pbp_fast.core.unit import DendriticUnit

__all__ = ["DendriticUnit", "DendriticConv2d", "DendriticLinear", "Candidate", "convert",
           "count_parameters", "ParameterCount", "replace_module", "PBConfig",
           "PerforatedBackprop", "Decision", "State", "History", "snapshot_state_dict"]
