"""`sftrl plan`: every program a run compiles, lowered and compiled at its real shapes on fake
devices, with per-device memory, FLOPs against the ideal, collectives and compile time.

    programs = planning.programs_for(cfg, mesh)        # SFT or RL config -> [Program]
    rows = [planning.analyse(p) for p in programs]     # compile each; figures per device

Nothing is allocated: parameters, optimiser state and batches are `jax.ShapeDtypeStruct`s with the
shardings the run would give them (`models.build.abstract_model` + the rules table).
"""

from sftrl_jax.planning.analysis import FIELDS, analyse, collectives, export_for
from sftrl_jax.planning.flops import ideal_train_flops, matmul_params
from sftrl_jax.planning.programs import Program, model_config_of, programs_for

__all__ = [
    "FIELDS",
    "Program",
    "analyse",
    "collectives",
    "export_for",
    "ideal_train_flops",
    "matmul_params",
    "model_config_of",
    "programs_for",
]
