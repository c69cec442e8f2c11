"""The HALRP method: rank estimation, perturbation training, pruning, accounting, checkpoints."""
from .accounting import paper_parameter_count, stored_bytes
from .allocation import Allocation, allocate_ranks, lowrank_init
from .callbacks import Callback, CSVLogger
from .checkpoint import CheckpointError
from .config import HALRPConfig
from .estimation import estimate_and_initialise, free_model
from .importance import empirical_fisher
from .learner import HALRPLearner, TaskReport
from .pruning import MODES as PRUNE_MODES
from .pruning import exact_quantile, growth, prune

__all__ = [
    "PRUNE_MODES",
    "Allocation",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "HALRPConfig",
    "HALRPLearner",
    "TaskReport",
    "allocate_ranks",
    "empirical_fisher",
    "estimate_and_initialise",
    "exact_quantile",
    "free_model",
    "growth",
    "lowrank_init",
    "paper_parameter_count",
    "prune",
    "stored_bytes",
]
