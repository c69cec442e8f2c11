"""The op table: the one declaration of every op of namespace ``halrp`` (it imports no provider).

Everything that names an op derives from it: the schemas that :mod:`halrp_fast.ops` registers, the op list the
router (:mod:`halrp_fast._backend`) reports, the reference and Triton providers' maps (functions named after the
ops), and the compiled extension's kernels (``{op without "perturbed_"}_{device}``, each checked at load against
the op's schema; :mod:`halrp_fast._ext`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from . import _checks

N_GRADS = 7
_OUTPUTS = "(Tensor, Tensor, Tensor)"
_GRADS = "(" + ", ".join(["Tensor"] * N_GRADS) + ")"
_GEOMETRY = "int[] stride, int[] padding, int[] dilation"


@dataclass(frozen=True)
class OpSpec:
    """One forward op (and, named ``{name}_backward``, its backward op).

    ``check(*inputs, *geometry)`` validates the static properties (FakeTensor-safe); ``mixed``: a ``task_ids``
    argument follows ``x`` and banks ``R, S, U, V, B`` stacked per task replace ``r, s, U, V, bias``; ``conv``:
    the op takes ``stride, padding, dilation`` after ``save`` (and before ``needs`` in its backward).
    """

    name: str
    check: Callable[..., None]
    mixed: bool
    conv: bool

    @property
    def weight_index(self) -> int:
        """Position of ``weight`` among the inputs."""
        return 2 if self.mixed else 1

    @property
    def n_inputs(self) -> int:
        """Inputs before ``save``: ``x, [task_ids,] weight, r|R, s|S, U, V, bias|B``."""
        return 8 if self.mixed else 7

    def _input_schema(self) -> str:
        scale = "R, S" if self.mixed else "r, s"
        names = ["x", *(["task_ids"] if self.mixed else []), "weight", *scale.split(", "), "U", "V"]
        return ", ".join(f"Tensor {n}" for n in names)

    def _forward_arguments(self, save: bool) -> str:
        """The forward's arguments: inputs, bias, then ``save`` (when asked) and the conv geometry."""
        bias = "Tensor? B" if self.mixed else "Tensor? bias"
        geo = f", {_GEOMETRY}" if self.conv else ""
        return f"{self._input_schema()}, {bias}{', bool save' if save else ''}{geo}"

    def schema(self) -> str:
        return f"({self._forward_arguments(save=True)}) -> {_OUTPUTS}"

    def autograd_schema(self) -> str:
        """A whole eager call with its autograd: the inputs without ``save``, the output ``y`` alone."""
        return f"({self._forward_arguments(save=False)}) -> Tensor"

    def backward_schema(self) -> str:
        geo = f"{_GEOMETRY}, " if self.conv else ""
        return (f"(Tensor grad, {self._input_schema()}, Tensor saved_base, Tensor saved_lowrank, bool has_bias, "
                f"{geo}bool[] needs) -> {_GRADS}")

    def grad_mask(self, needs_input_grad: Sequence[bool]) -> list[bool]:
        """The 7-entry mask ``needs`` from autograd's flags over the inputs (``task_ids`` left out)."""
        n = list(needs_input_grad[:self.n_inputs])
        if self.mixed:
            del n[1]
        return n

    def input_grads(self, grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
        """The op's 7 gradients as autograd wants them over the inputs: ``None`` where not needed and for
        ``task_ids``."""
        out: list[Tensor | None] = [g if n else None for g, n in zip(grads, needs, strict=True)]
        if self.mixed:
            out.insert(1, None)
        return out


LINEAR = OpSpec("perturbed_linear", _checks.check_linear, mixed=False, conv=False)
LINEAR_MT = OpSpec("perturbed_linear_mt", _checks.check_linear_mt, mixed=True, conv=False)
CONV2D = OpSpec("perturbed_conv2d", _checks.check_conv, mixed=False, conv=True)
CONV2D_MT = OpSpec("perturbed_conv2d_mt", _checks.check_conv_mt, mixed=True, conv=True)
TABLE: tuple[OpSpec, ...] = (LINEAR, LINEAR_MT, CONV2D, CONV2D_MT)

FIT_SCALINGS = "fit_scalings"
FIT_SCALINGS_SCHEMA = "(Tensor W_free, Tensor W) -> (Tensor, Tensor)"

#: every op name: each forward op, its backward op, then the scalings fit
OPS: tuple[str, ...] = (*(n for spec in TABLE for n in (spec.name, f"{spec.name}_backward")), FIT_SCALINGS)
#: the schema of every op (what follows its name), by name
SCHEMAS: dict[str, str] = {
    **{spec.name: spec.schema() for spec in TABLE},
    **{f"{spec.name}_backward": spec.backward_schema() for spec in TABLE},
    FIT_SCALINGS: FIT_SCALINGS_SCHEMA,
}
#: the schema of a kernel that runs a whole eager call of a forward op with its autograd, by forward op
AUTOGRAD_SCHEMAS: dict[str, str] = {spec.name: spec.autograd_schema() for spec in TABLE}
