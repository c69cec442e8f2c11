"""A converted model (:class:`TaskModel`, built by :func:`~halrp_fast.nn.conversion.convert`): serves one task or a
mixed batch, and holds every task's tensors."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ._context import TaskContext, TaskModule, TaskSelection, grouped_selection, outermost, select_tasks
from ._rows import RowOrder, batch_size, is_cache
from .heads import TaskHeads
from .perturbed import PerturbedLayer, _is_compiling
from .reparametrized import TaskReparametrized, exported_name, fast_paths_as_built
from .stand_ins import NOT_RUN, StandInServing
from .summary import shared_modules, summary_text


def _task_aware_modules(module: nn.Module, prefix: str = "", seen: set | None = None
                        ) -> Iterable[tuple[str, TaskModule]]:
    """``(qualified name, module)`` of the task-aware modules under ``module``, as ``named_modules`` gives them
    (order, and a shared module under its first name only).

    The per-task containers of a task-aware module (one entry per task) are not entered, so the walk costs the
    same with 1 or 1000 tasks.
    """
    seen = set() if seen is None else seen
    skip = module._task_containers if isinstance(module, TaskModule) else ()
    for name, child in module._modules.items():
        if child is None or name in skip or id(child) in seen:
            continue
        seen.add(id(child))
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, TaskModule):
            yield qualified, child
        yield from _task_aware_modules(child, qualified, seen)


class TaskModel(StandInServing, nn.Module):
    """A converted model: the frozen base is task 0, every later task adds its own small parameters.

    ``forward(x, task_ids)``: ``task_ids`` is an int (the whole batch) or an int64 tensor ``(M,)``
    with one task per sample (a mixed batch).  The wrapped model is ``self.model``; its structure is
    unchanged except that linear, conv, BatchNorm layers and the head are task-aware.

    ``grouped_mixed_batches``: a mixed batch of images runs in the grouped layout of
    :class:`~halrp_fast.nn._context.GroupedLayout` (the task groups side by side along the channels, every
    conv one grouped convolution over the tasks' merged weights) until its first linear layer.  Only valid
    for networks whose operations outside the task-aware layers act on each channel and sample separately
    (ReLU, pooling, dropout, residual sums, ``flatten(1)``); a channel-mixing operation such as
    ``torch.cat(..., dim=1)`` or a non-converted conv would mix tasks.  :func:`convert` sets it from the
    model's ``halrp_grouped_mixed_batches`` attribute (the library's LeNet, AlexNet and ResNet-18 declare it).
    """

    def __init__(self, model: nn.Module, ctx: TaskContext, head_name: str, grouped_mixed_batches: bool = False
                 ) -> None:
        super().__init__()
        self.grouped_mixed_batches = grouped_mixed_batches
        self.model = model
        self._ctx = ctx
        for name, module in self.task_modules().items():
            module.module_name = name
            if isinstance(module, PerturbedLayer):
                module.layer_name = name
        self.head_name = head_name
        self._lazy: dict[int, Callable[[], Mapping[str, torch.Tensor]]] = {}
        self._lazy_device = torch.device("cpu")
        #: PyTorch's fused paths that would read a wrapped attention's base weights, switched off in ``model`` by
        #: :func:`~halrp_fast.nn.reparametrized.fast_paths_off` (the base and exported models run them as built)
        self.fast_paths: list = []
        #: PyTorch transformer layers whose activations are sequence-first (their task-aware modules cannot tell
        #: the rows of a mixed batch): mixed batches are refused
        self.sequence_first: list[str] = []

    # ---------------------------------------------------------------- structure
    @property
    def heads(self) -> TaskHeads:
        """The :class:`TaskHeads` at :attr:`head_name` (resolved once: every forward asks for the task count)."""
        heads = self.__dict__.get("_heads")
        if heads is None:
            heads = self.model.get_submodule(self.head_name)
            self.__dict__["_heads"] = heads  # a plain reference, not a second registration of the submodule
        return heads

    @property
    def num_tasks(self) -> int:
        return self.heads.num_tasks

    @property
    def num_classes(self) -> list[int]:
        return list(self.heads.num_classes)

    def task_modules(self) -> dict[str, TaskModule]:
        """Every task-aware module by qualified name (relative to ``self.model``)."""
        return dict(_task_aware_modules(self.model))

    def perturbed_layers(self) -> dict[str, PerturbedLayer]:
        """The task-aware linear and conv layers by qualified name."""
        return {name: m for name, m in _task_aware_modules(self.model) if isinstance(m, PerturbedLayer)}

    def shared_modules(self) -> dict[str, tuple[str, int]]:
        """The modules whose own parameters every task shares with the base (embeddings, recurrent layers, excluded
        layers, ...): ``{name: (class name, number of parameters)}``."""
        return shared_modules(self.model, self.task_modules())

    def summary(self) -> str:
        """What each task has of its own (perturbed layers, norms, BatchNorms, head) and every module whose
        parameters all tasks share (``convert`` logs it at INFO level on the ``halrp_fast`` logger)."""
        modules = self.task_modules()
        return summary_text(modules, shared_modules(self.model, modules), self.head_name, self.num_tasks)

    def _layer(self, layer: str | PerturbedLayer) -> PerturbedLayer:
        if isinstance(layer, PerturbedLayer):
            return layer
        layers = self.perturbed_layers()
        if layer not in layers:
            raise ValueError(f"no task-aware linear/conv layer named {layer!r}; layers: {sorted(layers)}")
        return layers[layer]

    def _check_task(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"task must be an int, got {type(t).__name__}")
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task {t} is out of range: the model has tasks 0..{self.num_tasks - 1}")
        return t

    # ---------------------------------------------------------------- tasks
    def add_task(self, num_classes: int) -> int:
        """Add a task (initialised to the base, rank 0 everywhere) with its own head; returns its id."""
        t = self.heads.add_task(num_classes)
        for m in self.task_modules().values():
            if not isinstance(m, TaskHeads):
                m.add_task()
        return t

    def named_task_parameters(self, t: int) -> dict[str, nn.Parameter]:
        """What trains for task ``t``, by name (as in ``self.named_parameters()``).

        Task 0: every parameter of the base (the original model's parameters, including those of
        layers that are not task-aware).  Task ``t ≥ 1``: its ``r, s, U, V``, biases, BatchNorm affine
        parameters and head.
        """
        self._check_task(t)
        owned = {id(p) for m in self.task_modules().values() for p in m.parameters()}
        chosen = {id(p) for m in self.task_modules().values() for p in m.task_parameters(t)}
        out = {}
        for name, p in self.named_parameters():
            if id(p) in chosen or (t == 0 and id(p) not in owned):
                out[name] = p
        return out

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self.named_task_parameters(t).values())

    def freeze_task(self, t: int) -> None:
        """Stop gradients for task ``t``'s parameters (``requires_grad = False``)."""
        self._set_requires_grad(t, False)

    def unfreeze_task(self, t: int) -> None:
        self._set_requires_grad(t, True)

    def _set_requires_grad(self, t: int, flag: bool) -> None:
        if self._check_task(t) == 0:
            params = self.task_parameters(0)
        else:  # only task t's entries: the cost does not grow with the number of tasks
            params = [v for m in self.task_modules().values() for v in m.task_tensors_by_key(t).values()
                      if isinstance(v, nn.Parameter)]
        for p in params:
            p.requires_grad_(flag)

    def set_rank(self, task: int, layer: str | PerturbedLayer, U: torch.Tensor, V: torch.Tensor) -> None:
        """Give ``layer`` (name or module) for ``task`` the perturbation ``U (out, k)``, ``V (in, k)``."""
        self._layer(layer).set_rank(self._check_task(task), U, V)

    def ranks(self, task: int) -> dict[str, int]:
        """Rank of ``task``'s perturbation in every task-aware linear/conv layer."""
        self._check_task(task)
        return {name: m.rank(task) for name, m in self.perturbed_layers().items()}

    def task_of_state_key(self, key: str, modules: dict[str, TaskModule] | None = None) -> int:
        """The task owning ``key`` of ``self.state_dict()`` (0: the base and everything shared).

        ``modules``: :meth:`task_modules`, when the caller already has it (one traversal for many keys).
        """
        if not key.startswith("model."):
            return 0
        modules = self.task_modules() if modules is None else modules
        parts = key[len("model."):].split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest module-name prefix of the key owns it
            owner = modules.get(".".join(parts[:i]))
            if owner is not None:
                return owner.task_of_key(".".join(parts[i:]))
        return 0

    def split_state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """``self.state_dict()`` split by owning task (the extra state is left out)."""
        modules = self.task_modules()
        parts: dict[int, dict[str, torch.Tensor]] = {t: {} for t in range(self.num_tasks)}
        for key, value in self.state_dict().items():
            if isinstance(value, torch.Tensor):
                parts[self.task_of_state_key(key, modules)][key] = value
        return parts

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers stored for task ``t`` (task 0: the base and all shared state).

        For ``t ≥ 1`` only task ``t``'s entries are visited (the cost does not grow with the number of tasks).
        """
        if self._check_task(t) == 0:
            return self.split_state_dict()[0]
        return {f"model.{name}.{k}": v.detach() for name, m in self.task_modules().items()
                for k, v in m.task_tensors_by_key(t).items()}

    # ---------------------------------------------------------------- lazy tasks
    def add_lazy_task(self, num_classes: int, load: Callable[[], Mapping[str, torch.Tensor]],
                      shapes: Mapping[str, tuple[Iterable[int], torch.dtype]] | None = None) -> int:
        """Add a frozen task whose tensors are read only when the task is first used; returns its id.

        Until then the task holds shape-only placeholders (``meta`` tensors: no memory).  ``load()`` must
        return the tensors of :meth:`task_state_dict` ``(t)``; ``shapes`` (key → ``(shape, dtype)``, e.g.
        from a checkpoint manifest) gives the placeholders the stored shapes, so :meth:`ranks` is right
        before loading.  A forward pass over the task, :meth:`export_task` or :meth:`ensure_loaded` loads it.
        """
        if not callable(load):
            raise TypeError(f"load must be callable, got {type(load).__name__}")
        t = self.add_task(num_classes)
        current = self.task_state_dict(t)
        if shapes is not None and set(shapes) != set(current):
            self._remove_last_task()
            raise ValueError(f"shapes names tensors {sorted(set(shapes) ^ set(current))[:5]} that task {t} of this "
                             f"model does not have (or lacks)")
        self._lazy_device = self._base_device()
        for key, value in current.items():
            shape, dtype = (value.shape, value.dtype) if shapes is None else shapes[key]
            self._assign(key, torch.empty(tuple(shape), dtype=dtype, device="meta"))
        self.freeze_task(t)
        self._lazy[t] = load
        return t

    def _remove_last_task(self) -> None:
        """Undo the last :meth:`add_task` (used when a lazy task's description is refused): each task-aware module
        removes what its own ``add_task`` added."""
        for m in self.task_modules().values():
            m.remove_last_task()
        self._ctx.generation += 1

    @property
    def unloaded_tasks(self) -> list[int]:
        """Lazily added tasks whose tensors have not been read yet."""
        return sorted(self._lazy)

    def ensure_loaded(self, tasks: Iterable[int] | None = None) -> None:
        """Read the tensors of the lazily added ``tasks`` (default: all of them) not read yet."""
        if not self._lazy:
            return
        pending = sorted(self._lazy) if tasks is None else sorted({int(t) for t in tasks} & set(self._lazy))
        for t in pending:
            self.load_task_state(t, self._lazy[t](), exact_shapes=True)

    def load_task_state(self, t: int, state: Mapping[str, torch.Tensor], exact_shapes: bool = False) -> None:
        """Replace task ``t``'s (``t ≥ 1``) tensors by ``state`` (the keys of :meth:`task_state_dict` ``(t)``).

        ``U``/``V`` may come with another rank unless ``exact_shapes``; values are cast to the model's dtype and
        device; ``requires_grad`` stays as it was.  A lazily added task counts as loaded afterwards.
        """
        if self._check_task(t) == 0:
            raise ValueError("load_task_state is for tasks ≥ 1; load the base with load_state_dict")
        current = self.task_state_dict(t)
        if set(state) != set(current):
            raise ValueError(f"the state for task {t} has tensors {sorted(set(state) ^ set(current))[:5]} that "
                             f"differ from the task's")
        for key, now in current.items():
            value = state[key]
            rank_free = not exact_shapes and key.rsplit(".", 2)[-2] in ("U", "V")
            if (tuple(value.shape) != tuple(now.shape)) and not (rank_free and value.shape[:-1] == now.shape[:-1]):
                raise ValueError(f"the state for task {t} has {key} of shape {tuple(value.shape)}, expected "
                                 f"{tuple(now.shape)}")
        device = self._lazy_device if t in self._lazy else self._base_device()
        for key, now in current.items():
            self._assign(key, state[key].detach().to(device=device, dtype=now.dtype).clone())
        self._lazy.pop(t, None)
        for layer in self.perturbed_layers().values():
            layer.clear_caches()

    def _base_device(self) -> torch.device:
        """Where the model's (non-placeholder) tensors live."""
        for p in self.model.parameters():
            if not p.is_meta:
                return p.device
        return torch.device("cpu")

    def _assign(self, key: str, value: torch.Tensor) -> None:
        """Replace the parameter or buffer ``key`` (a state-dict key) by ``value``, keeping ``requires_grad``."""
        owner_name, _, leaf = key.rpartition(".")
        owner = self.get_submodule(owner_name)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            raise KeyError(f"{key} is neither a parameter nor a buffer of the model")

    def clear_caches(self) -> None:
        """Forget every merged weight and prepared tensor (they are rebuilt when next needed).  Changes through the
        library and in-place updates are seen without this; an in-place change made through ``.data`` is not (PyTorch
        gives ``.data`` a version counter of its own), so call it after one."""
        for m in self.task_modules().values():
            m.clear_caches()

    def _apply(self, fn, recurse=True):
        if not self._lazy:
            return super()._apply(fn, recurse)
        # Placeholders cannot be moved: they take the dtype the loaded tasks get, and loading uses the new device.
        probe = fn(torch.zeros((), device=self._lazy_device))

        def apply(t: torch.Tensor) -> torch.Tensor:
            if t.is_meta:
                return t.to(dtype=probe.dtype) if t.is_floating_point() and probe.is_floating_point() else t
            return fn(t)

        self._lazy_device = probe.device
        return super()._apply(apply, recurse)

    # ---------------------------------------------------------------- forward
    def forward(self, *inputs, task_ids=None, **kwargs):
        """``model(x, task_ids)``, ``model(x, task_ids, **kwargs)`` or ``model(*inputs, task_ids=…, **kwargs)``: the
        wrapped model called with ``inputs`` and ``kwargs`` (every keyword input forwarded) for the tasks
        ``task_ids`` selects — an int for the whole batch, or an int64 tensor ``(M,)`` with one task per row.  Without
        ``task_ids=`` the last positional argument is the task ids.  Returns what the wrapped model returns (a tensor,
        a transformers ``ModelOutput``, ...); for a mixed batch every per-row output, key/value caches included, is in
        batch order (see :mod:`~halrp_fast.nn._rows`)."""
        inputs, task_ids = _split_task_ids(inputs, task_ids)
        if torch.compiler.is_compiling():
            return self._forward(inputs, kwargs, task_ids)
        # One forward at a time (threads wait their turn): the task selection, the watch and the stand-ins' places
        # are state shared by the model's modules for the duration of a forward.
        with self._ctx.lock:
            return self._watched(task_ids, lambda: self._forward(inputs, kwargs, task_ids))

    def _watched(self, task_ids, run: Callable[[], object]):
        """``run()``, and for a later task a check that no converted layer had its weights read while its own
        forward did not run."""
        if self._ctx.watch is not None or (isinstance(task_ids, int) and task_ids == 0):
            return run()
        # A later task: note which layers run and which have their weights read by other code.
        watch: dict[str, set[str]] = {"ran": set(), "read": set()}
        self._ctx.watch = watch
        try:
            out = run()
        finally:
            self._ctx.watch = None
        bypassed = sorted(watch["read"] - watch["ran"])
        if bypassed:
            raise RuntimeError(
                f"converted layer(s) {bypassed} had their weights read by other code while their own forward did not "
                f"run, so that code computed the base for every task (e.g. an attention module passing the weight to "
                f"a function). Keep the module that reads them shared with convert(..., exclude=[...]); "
                f"convert(..., example_input=x) lists every such layer")
        return out

    def _select(self, inputs: tuple, kwargs: dict, task_ids) -> TaskSelection:
        """The batch's selection (the task ids checked against the batch size and the tasks), lazy tasks loaded."""
        first = inputs[0] if len(inputs) == 1 and not kwargs else None
        if isinstance(first, torch.Tensor):  # the common call: one tensor
            rows, device = (first.shape[0] if first.dim() else 0), first.device
        elif len(inputs) == 1 and not kwargs:
            raise TypeError(f"x must be a tensor, got {type(first).__name__}")
        else:
            rows, device = batch_size(inputs, kwargs), None
        sel = select_tasks(task_ids, rows, self.num_tasks, device)
        if self._lazy:
            self.ensure_loaded([sel.single] if sel.single is not None else sel.tasks)
        return sel

    def _forward(self, inputs: tuple, kwargs: dict, task_ids, stand_ins: bool = True):
        """``stand_ins``: a single-task forward without autograd may run the wrappers' stand-ins (stand_ins.py)."""
        sel = self._select(inputs, kwargs, task_ids)
        if sel.single is not None:  # the serving path: TaskContext.use() inlined
            ctx = self._ctx
            previous, ctx.selection = ctx.selection, sel
            try:
                return self._run_single(sel.single, inputs, kwargs, stand_ins)
            finally:
                ctx.selection = previous
        if self.sequence_first:
            raise ValueError(f"a mixed-task batch needs batch-first activations, and {self.sequence_first} take "
                             f"sequence-first ones (batch_first=False): run one task at a time, or build them with "
                             f"batch_first=True")
        # Rows of a task next to each other once, so every layer takes its task groups as views.
        rows_sel = sel.sorted()
        if sel.spans is not None:
            return self._forward_sorted(inputs, kwargs, rows_sel)
        rows = sel.order.shape[0]
        to_sorted, to_batch = RowOrder(sel.order, rows), RowOrder(sel.restore, rows)
        try:
            out = self._forward_sorted(*to_sorted.inputs(inputs, kwargs), rows_sel)
            return to_batch(out)
        finally:  # caches given as inputs are in batch order again, whatever happened
            to_batch(list(to_sorted.caches.values()))

    def _run_single(self, t: int, inputs: tuple, kwargs: dict, stand_ins: bool):
        if stand_ins and not torch.is_grad_enabled():
            # The base through stand-ins (its attention: the original modules) may take PyTorch's fused paths.
            as_built = fast_paths_as_built(self.model, self.fast_paths if t == 0 else [])
            with as_built:
                out = self._run_with_stand_ins(t, lambda: self.model(*inputs, **kwargs))
            if out is not NOT_RUN:
                return out
        return self.model(*inputs, **kwargs)

    def _forward_sorted(self, inputs: tuple, kwargs: dict, rows_sel: TaskSelection):
        """The wrapped model on a mixed batch whose rows are sorted by task (``rows_sel``)."""
        x = inputs[0] if len(inputs) == 1 and not kwargs else None
        grouped = self._grouped_selection(x, rows_sel) if isinstance(x, torch.Tensor) else None
        if grouped is None:
            with self._ctx.use(rows_sel):
                return self.model(*inputs, **kwargs)
        layout = grouped.grouped
        with self._ctx.use(grouped):
            out = self.model(layout.group(x))
        return tree_map(lambda o: layout.ungroup(o) if isinstance(o, torch.Tensor) and layout.holds(o) else o, out)

    # ---------------------------------------------------------------- generation
    def generate(self, *inputs, task_ids, **kwargs):
        """The wrapped model's ``generate`` (a transformers model: greedy, sampling, beam search, ...) run for
        ``task_ids`` — an int, or an int64 tensor ``(M,)`` with one task per row of the prompt batch — with every task's
        layers and head; ``inputs``/``kwargs`` go to ``generate`` as given.  A mixed batch generates with its rows
        sorted by task and returns every per-row output (the sequences, scores, caches) in batch order: each row is
        what its task alone generates."""
        generate = getattr(self.model, "generate", None)
        if not callable(generate):
            raise TypeError(f"the wrapped model ({type(self.model).__name__}) has no generate()")
        with self._ctx.lock:
            sel = self._select(inputs, kwargs, task_ids)
            if sel.single is not None:
                with self._ctx.use(sel):
                    return self._watched(sel.single, lambda: generate(*inputs, **kwargs))
            return self._watched(task_ids, lambda: self._generate_mixed(generate, inputs, kwargs, sel))

    def _generate_mixed(self, generate, inputs: tuple, kwargs: dict, sel: TaskSelection):
        """``generate`` on the rows sorted by task; each forward of the wrapped model takes the selection of its own
        batch (``generate`` repeats every row ``k`` times for ``k`` beams or return sequences: each task's rows stay
        together), and the output rows go back to batch order."""
        rows = sel.local_ids.shape[0]
        sorted_ids = torch.tensor(sel.tasks, device=sel.local_ids.device)[sel.local_ids].index_select(0, sel.order)
        selections: dict[int, TaskSelection] = {rows: sel.sorted()}

        def select_batch(module, args, call_kwargs):
            n = batch_size(args, call_kwargs)
            if n not in selections:
                if n % rows:
                    raise RuntimeError(f"generate ran the model on {n} rows, not a multiple of the {rows} prompts")
                selections[n] = select_tasks(sorted_ids.repeat_interleave(n // rows), n, self.num_tasks).sorted()
            self._ctx.selection = selections[n]

        to_sorted = RowOrder(sel.order, rows)
        hook = self.model.register_forward_pre_hook(select_batch, with_kwargs=True)
        try:
            sorted_inputs, sorted_kwargs = to_sorted.inputs(inputs, kwargs)
            with self._ctx.use(selections[rows]):  # also for an encoder that generate calls on its own
                out = generate(*sorted_inputs, **sorted_kwargs)
        finally:
            hook.remove()
            RowOrder(sel.restore, rows)(list(to_sorted.caches.values()))
        return _restore_rows(out, sel.restore)

    def _grouped_selection(self, x: torch.Tensor, sel: TaskSelection) -> TaskSelection | None:
        """The grouped layout for a mixed image batch in inference (no autograd: the convs run through merged
        weights) when the model allows it (:attr:`grouped_mixed_batches`)."""
        if not self.grouped_mixed_batches or x.dim() != 4 or torch.is_grad_enabled() or _is_compiling():
            return None
        return grouped_selection(sel)

    # ---------------------------------------------------------------- coverage
    def check_coverage(self, *inputs, **kwargs) -> None:
        """Run the base on ``inputs`` and ``kwargs`` (as ``model(*inputs, task_ids=0, **kwargs)``, no gradient) and
        raise one ``ValueError`` naming every task-aware layer whose
        forward did not run (among them those whose weights other code reads directly): such a layer would compute
        the base for every task (a silent no-op).  Keep those modules shared with ``convert(..., exclude=[...])``."""
        audit: dict[str, set[str]] = {"ran": set(), "read": set()}
        previous, self._ctx.watch = self._ctx.watch, audit
        try:
            with torch.no_grad():
                self._forward(inputs, kwargs, 0, stand_ins=False)  # every wrapper's own forward: notes what ran
        finally:
            self._ctx.watch = previous
        layers = self.perturbed_layers()
        unused = [name for name in layers if name not in audit["ran"]]
        read = [name for name in unused if name in audit["read"]]
        if unused or read:
            parts = []
            if unused:
                parts.append(f"never ran in the forward: {unused}")
            if read:
                parts.append(f"have their weights read directly by other code (which would use the base weights for "
                             f"every task): {read}")
            raise ValueError(f"{len(set(unused) | set(read))} converted layer(s) would not be task-aware: "
                             f"{'; '.join(parts)}. Keep them (or the modules that read them) shared with "
                             f"convert(..., exclude=[...])")

    # ---------------------------------------------------------------- export
    def export_task(self, t: int) -> nn.Module:
        """An ordinary model (plain ``nn.Linear``/``nn.Conv2d``/BatchNorm/head) computing task ``t``.

        Linear and conv layers hold the merged weight ``diag(r) W diag(s) + U Vᵀ``; the result needs no
        ``halrp_fast`` at run time and is called as ``plain(x)``.
        """
        self._check_task(t)
        self.ensure_loaded([t])
        plain = copy.deepcopy(self.model)
        modules = self.task_modules()
        for name in outermost(modules):  # a task-aware module's plain form includes its descendants
            _set_submodule(plain, name, modules[name].to_plain(t))
        for name, attr, value in self.fast_paths:  # its attention reads its own weights: PyTorch's fused paths serve
            setattr(plain.get_submodule(name), attr, value)
        return plain

    def plain_sources(self) -> dict[str, tuple[str, str | None]]:
        """Where each task-aware linear/conv layer's weight and bias live in a model from :meth:`export_task`:
        ``{layer name: (weight path, bias path or None)}`` (relative to ``self.model``; a transformers ``Conv1D``
        stores its weight transposed, see :attr:`PerturbedLayer.plain_transposed`)."""
        out, wrappers = {}, []
        for name, m in self.task_modules().items():
            if isinstance(m, TaskReparametrized):
                wrappers.append(name)
                for proj, (weight_path, bias_path) in m.paths.items():
                    out[f"{name}.projections.{proj}"] = (f"{name}.{weight_path}",
                                                         bias_path and f"{name}.{bias_path}")
        for name, layer in self.perturbed_layers().items():
            if name not in out:
                name_out = exported_name(name, wrappers)
                out[name] = (f"{name_out}.weight", f"{name_out}.bias" if layer.bias is not None else None)
        return out

    # ---------------------------------------------------------------- state
    def get_extra_state(self):
        return {"num_classes": self.num_classes}

    def set_extra_state(self, state) -> None:
        """On ``load_state_dict``: add the tasks the state holds (before the children load their values)."""
        wanted = list(state["num_classes"])
        have = self.num_classes
        if wanted[: len(have)] != have[: len(wanted)] or len(wanted) < len(have):
            raise ValueError(f"state dict holds tasks with classes {wanted}, this model has {have}: "
                             f"load it into a freshly converted model of the same architecture")
        for n in wanted[len(have):]:
            self.add_task(n)


def _restore_rows(out, restore: torch.Tensor):
    """``out`` of a batch generated in sorted order, each per-row value in batch order; a row repeated ``k`` times
    (beams, return sequences) keeps its repeats together."""
    rows = restore.shape[0]
    first = next((leaf for leaf in tree_flatten(out, is_leaf=is_cache)[0]
                  if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] % rows == 0), None)
    if first is None:
        return out
    k = first.shape[0] // rows
    index = (restore[:, None] * k + torch.arange(k, device=restore.device)).reshape(-1) if k > 1 else restore
    return RowOrder(index, rows * k)(out)


def _split_task_ids(inputs: tuple, task_ids) -> tuple[tuple, object]:
    """``(inputs, task_ids)`` of a call: ``task_ids=`` as given, else the last positional argument."""
    if task_ids is not None:
        return inputs, task_ids
    if len(inputs) < 2:
        raise TypeError("task_ids is missing: call model(x, task_ids) or model(*inputs, task_ids=..., **kwargs)")
    return inputs[:-1], inputs[-1]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
