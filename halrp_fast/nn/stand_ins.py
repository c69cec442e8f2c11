"""Single-task inference with the task-aware wrappers out of the call path.

A task-aware normalisation, head or attention wrapper adds one module call around the module that does the work
(task ``t``'s ``LayerNorm``, its head, the attention with its weights in place).  In a single-task forward without
autograd that layer of calls is pure bookkeeping, and on a ViT it is measurable: besides its own Python time it
slows the tensor operations around it (the host work between them evicts their data).  So for such a forward the
:class:`~halrp_fast.nn.model.TaskModel` puts each wrapper's :class:`StandIn` — a module computing exactly the
wrapper's forward for that task (:meth:`~halrp_fast.nn._context.TaskModule.stand_in`) — in the wrapper's place in its
parent, runs the unmodified model, and puts every wrapper back (also when the forward raises).

Inside :meth:`TaskModel.serving() <halrp_fast.nn.model.TaskModel.serving>` the parameters are taken as constants, so
the stand-ins of a task — the linear and conv layers' merged weights included — are prepared once and reused by every
forward of that task, with no per-layer check of the parameters' versions (on a cold cache those checks cost more
than the module calls they guard).  :class:`ServingSession` keeps them, drops them when the library changes a
layer (``set_rank``, ``load_state_dict``, ``to()``: :attr:`TaskContext.generation`), and on leaving verifies that
nothing else changed a tensor they were prepared from.

Only the parents' ``_modules`` entries (and, for attention, its owners' attributes) change, for the duration of the
call; a task-aware module that is not reached through them (held in a plain list, say) still runs itself, as the
task selection is published as usual.  Task-aware modules with forward hooks, or any global module hook, keep the
ordinary path, so every hook runs as registered.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from ._cache import tensor_key
from ._context import TaskModule

#: (parent, child name, task-aware module) for each place a task-aware module with a stand-in sits in the model
Edge = tuple[nn.Module, str, TaskModule]


@dataclass
class StandIn:
    """What runs in a task-aware module's place for one task: ``module`` goes into the parent; ``places`` are
    ``(owner, attribute, tensor)`` set on modules inside it for the call (attention reading its projections'
    weights); ``sources`` the tensors that ``module``/``places`` were derived from (checked by a session)."""

    module: nn.Module
    places: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    sources: tuple[torch.Tensor | None, ...] = ()


def stand_in_edges(root: nn.Module) -> list[Edge]:
    """Every ``(parent, name, module)`` below ``root`` where ``module`` is task-aware and has a stand-in; descends
    through everything else, and into a wrapper's stand-in tree (:meth:`TaskModule.stand_in_tree`) where task-aware
    modules may sit too.  A shared parent is visited once."""
    edges: list[Edge] = []
    seen: set[int] = set()

    def walk(parent: nn.Module) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for name, child in parent._modules.items():
            if child is None:
                continue
            if isinstance(child, TaskModule):
                if child.has_stand_in:
                    edges.append((parent, name, child))
                inner = child.stand_in_tree()
                if inner is not None:
                    walk(inner)
            else:
                walk(child)

    walk(root)
    return edges


def global_hooks() -> bool:
    """Whether any global module hook is registered (it would see the stand-ins instead of the modules)."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


#: what :func:`run_with_stand_ins` returns when it did not run because a task-aware module has a forward hook (or
#: stand-ins may not be used at all), and when an edge's parent no longer holds its module
NOT_RUN = object()
MOVED = object()


def run_with_stand_ins(edges: list[Edge], stand_ins: list[StandIn | None], run: Callable[[], object]):
    """``run()`` with each edge's module replaced in its parent by its stand-in (``stand_ins[i]`` for ``edges[i]``,
    ``None``: left in place) and the stand-ins' attributes placed; everything is put back afterwards, whatever
    ``run`` does.  Returns without running :data:`MOVED` when an edge's parent no longer holds its module (the
    structure changed: walk it again), :data:`NOT_RUN` when the module has a forward hook (it would not run)."""
    swapped: list[Edge] = []
    placed: list[tuple[nn.Module, str]] = []
    try:
        for edge, stand_in in zip(edges, stand_ins, strict=True):
            parent, name, module = edge
            if parent._modules.get(name) is not module:
                return MOVED
            if module._forward_hooks or module._forward_pre_hooks:
                return NOT_RUN
            if stand_in is None:
                continue
            for owner, leaf, value in stand_in.places:
                owner.__dict__[leaf] = value  # a plain attribute: the parameter it replaces was removed
                placed.append((owner, leaf))
            parent._modules[name] = stand_in.module
            swapped.append(edge)
        return run()
    finally:
        for parent, name, module in reversed(swapped):
            parent._modules[name] = module
        for owner, leaf in placed:
            owner.__dict__.pop(leaf, None)


class ServingSession:
    """The stand-ins of every task served since :meth:`TaskModel.serving` was entered, prepared once per task.

    ``stand_ins(t, edges, generation)`` gives task ``t``'s stand-ins for ``edges``, prepared on first use and again
    after the library changed a layer (``generation``) or the model's structure changed (other ``edges``).
    :meth:`changed` names the modules whose stand-ins are stale now: prepared from tensors that have changed since,
    or a task's live module (norm, head) that has been replaced.
    """

    def __init__(self) -> None:
        self.depth = 0
        #: task → (generation, edges, stand-in per edge, tensor_key of its sources)
        self._plans: dict[int, tuple[int, list[Edge], list[StandIn | None], list[tuple | None]]] = {}
        self._retired: list[tuple[int, list[Edge], list[StandIn | None], list[tuple | None]]] = []

    def stand_ins(self, t: int, edges: list[Edge], generation: int) -> list[StandIn | None]:
        held = self._plans.get(t)
        if held is not None and held[0] == generation and held[1] is edges:
            return held[2]
        if held is not None and held[0] == generation:
            self._retired.append((t, *held[1:]))  # the structure changed: what the old stand-ins served is checked too
        stand_ins = [module.stand_in(t, constant=True) for _, _, module in edges]
        keys = [None if s is None else tensor_key(s.sources) for s in stand_ins]
        if any(s is not None and s.sources and k is None for s, k in zip(stand_ins, keys, strict=True)):
            return stand_ins  # sources without version counters (inference tensors) cannot be checked later
        self._plans[t] = (generation, edges, stand_ins, keys)
        return stand_ins

    def changed(self) -> list[TaskModule]:
        """The modules whose stand-in is stale (see the class)."""
        stale_modules: dict[int, TaskModule] = {}
        plans = [(t, *held[1:]) for t, held in self._plans.items()] + self._retired
        for t, edges, stand_ins, keys in plans:
            for (_, _, module), stand_in, key in zip(edges, stand_ins, keys, strict=True):
                if stand_in is None:
                    continue
                stale = tensor_key(stand_in.sources) != key if stand_in.sources else \
                    module.stand_in(t, constant=False).module is not stand_in.module
                if stale:
                    stale_modules[id(module)] = module
        return list(stale_modules.values())


class StandInServing:
    """What :class:`~halrp_fast.nn.model.TaskModel` does with stand-ins (it holds ``model``, the wrapped network, and
    ``_ctx``, the task context): :meth:`serving` and the forward's :meth:`_run_with_stand_ins`."""

    def _run_with_stand_ins(self, t: int, run: Callable[[], object]):
        """``run()`` (a single-task forward of task ``t`` without autograd) with the task-aware modules' stand-ins in
        their places (see the module docstring): inside :meth:`serving` every one's, prepared once; else the
        wrappers' (norms, heads, attention).  :data:`NOT_RUN` when compiling or when a hook would be skipped."""
        if torch.compiler.is_compiling() or global_hooks():
            return NOT_RUN
        session = self.__dict__.get("_session")
        for _ in range(2):  # a second time when the structure changed since the edges were walked
            walked = self.__dict__.get("_edges")  # plain references, not registrations
            if walked is None:
                every = stand_in_edges(self.model)
                walked = self.__dict__["_edges"] = (every, [e for e in every if e[2].stands_in_per_call])
            if session is not None:
                edges = walked[0]
                stand_ins = session.stand_ins(t, edges, self._ctx.generation)
            else:
                edges = walked[1]
                stand_ins = [module.stand_in(t, constant=False) for _, _, module in edges]
            out = run_with_stand_ins(edges, stand_ins, run)
            if out is not MOVED:
                return out  # ran, or a hook forbids stand-ins
            del self.__dict__["_edges"]
        return NOT_RUN

    @contextmanager
    def serving(self):
        """Serve on constant parameters: inside, a single-task forward without autograd runs every task-aware module
        through a stand-in prepared once per task (merged weights held, no per-layer check that the parameters are
        unchanged), so it costs what the exported plain model costs.  ::

            with torch.inference_mode(), model.serving():
                for x, t in requests:
                    y = model(x, t)

        What the library changes (``set_rank``, ``load_state_dict``, ``load_task_state``, ``to()``) is picked up by
        the next forward.  Other changes to a task's tensors (an optimiser step, an in-place edit) are not: on
        leaving, a ``RuntimeError`` names every module whose tensors changed inside, as the forwards after the
        change used the tensors from before it.  Forwards with autograd, mixed-task batches and compiled code take
        the ordinary path.  Re-entrant; yields the model."""
        session = self.__dict__.get("_session")
        if session is None:
            session = self.__dict__["_session"] = ServingSession()
        session.depth += 1
        completed = False
        try:
            yield self
            completed = True
        finally:
            session.depth -= 1
            if session.depth == 0:
                del self.__dict__["_session"]
        stale = session.changed() if completed and session.depth == 0 else []
        if stale:
            names = {id(m): name for name, m in self.task_modules().items()}
            changed = sorted(names.get(id(m), type(m).__name__) for m in stale)
            raise RuntimeError(f"{len(changed)} task-aware module(s) had tensors changed inside model.serving(), whose "
                               f"forwards after the change used the tensors from before it: {changed}. Change "
                               f"parameters outside serving() (the library's own set_rank/load_state_dict/to() are "
                               f"picked up inside)")
