"""Compiled forward passes that serve every task with one graph.

A converted model reads task ``t``'s tensors from per-task containers keyed by ``t``, so compiling it directly would
specialise on ``t`` and compile again for every task.  Here the model's structure is compiled once, as a plain
*template* (``export_task(0)``: ordinary ``Linear``/``Conv2d``/norm layers and a head) run with
:func:`torch.func.functional_call` on tensors passed as inputs:

* ``plain(params, x)``: the template on a full set of plain tensors (the base, a free model, or a task's merged
  weights in inference);
* ``task(layers, merges, params, x)``: task ``t``'s layers computed inside the graph from ``W, r, s, U, V`` by each
  layer's own merge (so gradients reach the task's ``r, s, U, V``), everything else from ``params``.

Tasks ≥ 1 have the same structure, so the graph is reused; ranks differ per task and per layer, so the rank
dimension of ``U``/``V`` is marked dynamic.  A new head size, a train/eval switch or gradient mode compile once more.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..nn import TaskModel
from ..nn.heads import TaskHeads
from ..nn.norm import PerTaskModules
from ..nn.reparametrized import TaskReparametrized, exported_name
from .config import COMPILE_MODES


def _plain_forward(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor):
    return functional_call(template, params, (x,), strict=False)


def _task_forward(template: nn.Module, layers: dict[str, nn.Module], merges: dict[str, tuple],
                  params: dict[str, torch.Tensor], x: torch.Tensor):
    """``merges``: template weight path → ``(W, r, s, U, V)`` of the task-aware layer ``layers[path]``, merged here by
    that layer's own rule."""
    tensors = dict(params)
    for path, sources in merges.items():
        tensors[path] = layers[path].merge_as_plain(*sources)
    return functional_call(template, tensors, (x,), strict=False)


def _rank_dynamic(sources: tuple) -> tuple:
    """A layer's ``(W, r, s, U, V)`` with the rank dimension of ``U``, ``V`` dynamic: ranks 0 and 1 (which would
    specialise the graph) padded to 2 with zero columns (which add exact zeros), others as plain-tensor views (the
    graph guards on the type).  Per call, so that the optimiser's in-place updates are seen."""
    W, r, s, U, V = sources
    if U.shape[1] < 2:
        U, V = (torch.nn.functional.pad(m, (0, 2 - m.shape[1])) for m in (U, V))
    else:
        U, V = U.view_as(U), V.view_as(V)
    torch._dynamo.mark_dynamic(U, 1)
    torch._dynamo.mark_dynamic(V, 1)
    return (W, r, s, U, V)


class CompiledTasks:
    """``torch.compile``\\ d forward passes of ``model``'s tasks (``mode``: a ``torch.compile`` mode), one graph for
    all tasks of the same head size.

    ``forward(t, grad)`` returns ``x ↦ logits`` for task ``t`` (the template's train/eval mode follows the model's):
    with ``grad`` the task's ``r, s, U, V``, biases, norms and head receive gradients (task 0: the base's
    parameters); without, inference runs on the cached merged weights.  ``free_forward(free)`` runs a free model
    (a plain copy of the base with its own head) through the same template.
    """

    def __init__(self, model: TaskModel, mode: str = "default", backend: str = "inductor") -> None:
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        self.model = model
        self.template = model.export_task(0)
        for p in self.template.parameters():
            p.requires_grad_(False)
        options = dict(fullgraph=True, backend=backend)
        if backend == "inductor":
            options["mode"] = mode
        self._plain = torch.compile(_plain_forward, **options)
        self._task = torch.compile(_task_forward, **options)
        self._layers = model.perturbed_layers()
        self._sources = model.plain_sources()
        self._layer_at = {self._sources[name][0]: layer for name, layer in self._layers.items()}

    # ---------------------------------------------------------------- the template's tensors for task t
    def _shared(self) -> dict[str, torch.Tensor]:
        """Tensors outside every task-aware module (shared by all tasks), keyed as in the template."""
        modules = self.model.task_modules()
        wrappers = [n for n, m in modules.items() if isinstance(m, TaskReparametrized)]
        owned = [n for n, m in modules.items() if not isinstance(m, TaskReparametrized)]
        out = {}
        for key, value in self.model.model.state_dict(keep_vars=True).items():
            if any(key.startswith(n + ".") for n in owned):
                continue
            out[exported_name(key, wrappers)] = value
        return out

    def _per_task(self, t: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s norms and head, keyed as in the template."""
        out = {}
        for name, m in self.model.task_modules().items():
            if isinstance(m, PerTaskModules):
                part = m.module_of(t)
            elif isinstance(m, TaskHeads):
                part = m.heads[t]
            else:
                continue
            for k, v in part.state_dict(keep_vars=True).items():
                out[f"{name}.{k}"] = v
        return out

    def _layer_tensors(self, t: int, grad: bool) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
        """``(merges, plain)``: with ``grad`` (tasks ≥ 1) each layer's sources, merged inside the graph; else each
        layer's weight (task 0's, or the cached merged one) and bias as plain tensors."""
        merges, plain = {}, {}
        for name, layer in self._layers.items():
            weight_path, bias_path = self._sources[name]
            if t == 0 or not grad:
                weight, bias = layer.task_weight(t)
                plain[weight_path] = weight.T if layer.plain_transposed else weight
            else:
                r, s, U, V, bias = layer.task_tensors(t)
                merges[weight_path] = (layer.weight, r, s, U, V)
            if bias_path is not None:
                plain[bias_path] = bias
        return merges, plain

    def forward(self, t: int, grad: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ model(x, t)`` through the compiled template, in the model's train/eval mode at each call.

        The tensors are gathered now: with ``grad`` a training phase's closure (the optimiser updates them in
        place); without, an evaluation's (merged weights of the current values)."""
        self.model.ensure_loaded([t])
        with torch.set_grad_enabled(grad):
            merges, plain = self._layer_tensors(t, grad)
        params = {**self._shared(), **self._per_task(t), **plain}
        if not grad:  # plain tensors whatever their origin (parameters, cached merged weights): one graph
            params = {k: v.detach() for k, v in params.items()}

        def run(x):
            self.template.train(self.model.training)
            if merges:
                return self._run(self._task, self.template, self._layer_at,
                                 {k: _rank_dynamic(v) for k, v in merges.items()}, params, x)
            return self._run(self._plain, self.template, params, x)
        return run

    def free_forward(self, free: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ free(x)`` through the compiled template (``free``: export_task(0)'s structure with a task head)."""
        params = dict(free.state_dict(keep_vars=True))

        def run(x):
            self.template.train(free.training)
            return self._run(self._plain, self.template, params, x)
        return run

    @staticmethod
    def _run(fn, *args):
        # the rank dimension varies by task and layer: parameters' shapes must not be forced static
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return fn(*args)
