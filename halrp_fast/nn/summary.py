"""What a converted model makes per-task and what it leaves shared: :func:`shared_modules` and the text of
:meth:`TaskModel.summary <halrp_fast.nn.model.TaskModel.summary>` (also logged by ``convert``)."""
from __future__ import annotations

from collections import Counter

from torch import nn

from ._context import TaskModule
from .batchnorm import TaskBatchNorm
from .norm import TaskNorm
from .perturbed import PerturbedLayer
from .reparametrized import TaskReparametrized


def shared_modules(model: nn.Module, task_modules: dict[str, TaskModule]) -> dict[str, tuple[str, int]]:
    """The modules of ``model`` (a converted model's ``model``) whose own parameters stay the base's for every task
    (embeddings, recurrent layers, excluded or unconverted layers, a wrapped attention's bias tables, layer scales,
    ...): ``{qualified name: (class name, number of parameters)}``.  ``task_modules``: its task-aware modules by
    name."""
    per_task = [name for name, m in task_modules.items() if not isinstance(m, TaskReparametrized)]
    projections = [f"{name}.projections" for name, m in task_modules.items() if isinstance(m, TaskReparametrized)]
    out: dict[str, tuple[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TaskModule) or any(name == p or name.startswith(p + ".") for p in per_task + projections):
            continue
        own = [p for p in module._parameters.values() if p is not None]
        if own:
            out[name or "(the model itself)"] = (type(module).__name__, sum(p.numel() for p in own))
    return out


def summary_text(task_modules: dict[str, TaskModule], shared: dict[str, tuple[str, int]], head_name: str,
                 num_tasks: int) -> str:
    """One paragraph: what each task has of its own, and every module it shares with the base."""
    kinds = Counter()
    for module in task_modules.values():
        if isinstance(module, PerturbedLayer):
            kinds["perturbed " + ("conv" if module.weight_dims == 4 else "linear") + " layers"] += 1
        elif isinstance(module, TaskNorm):
            kinds["norms"] += 1
        elif isinstance(module, TaskBatchNorm):
            kinds["BatchNorms"] += 1
        elif isinstance(module, TaskReparametrized):
            kinds["modules run with their layers' task weights"] += 1
    own = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no perturbed layer"
    lines = [f"{num_tasks} task(s); each task has its own: {own}, head {head_name!r}"]
    if shared:
        total = sum(n for _, n in shared.values())
        listed = ", ".join(f"{name!r} ({cls}, {n})" for name, (cls, n) in shared.items())
        lines.append(f"shared by every task (the base's {total} parameters): {listed}")
    else:
        lines.append("shared by every task: nothing besides the base weights of the perturbed layers")
    return "\n".join(lines)

