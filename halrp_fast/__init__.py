"""halrp_fast: Hessian-Aware Low-Rank Perturbation continual learning with fused kernels.

Importing the package registers the ``halrp::`` ops and loads the compiled extension ``halrp_fast._C`` when it
is built (see :mod:`halrp_fast._ext`); it never imports Triton.  :func:`register_provider` adds an implementation
of the ops (a :class:`Provider`) that serves eager calls, ``torch.ops.halrp`` and ``torch.compile`` alike.
"""
from . import (
    _ext,
    data,
    metrics,
    models,
    nn,
    ops,  # noqa: F401  (registers the halrp:: ops)
)
from ._backend import Provider, register_provider
from ._backend import env_report as _env_report
from ._version import __version__
from .continual import HALRPConfig, HALRPLearner
from .cpu_allocator import tune_cpu_allocator
from .functional import perturbed_conv2d, perturbed_conv2d_mt, perturbed_linear, perturbed_linear_mt
from .nn import TaskModel, convert

_ext.load()  # the compiled kernels register their private ops (offered as the "cpp"/"cuda_ext" providers)


def env_report() -> str:
    """Which implementation serves each op on each device, and why (also printed by ``halrp-fast env``)."""
    return _env_report()


__all__ = [
    "HALRPConfig",
    "HALRPLearner",
    "Provider",
    "TaskModel",
    "__version__",
    "convert",
    "data",
    "env_report",
    "metrics",
    "models",
    "nn",
    "perturbed_conv2d",
    "perturbed_conv2d_mt",
    "perturbed_linear",
    "perturbed_linear_mt",
    "register_provider",
    "tune_cpu_allocator",
]
