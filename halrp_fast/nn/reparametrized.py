"""Modules whose own code reads their projection weights (attention that passes ``self.qkv.weight`` to a function,
``nn.MultiheadAttention``'s ``in_proj_weight``): each task runs the unmodified module with its own weights in place.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._cache import DerivedCache
from ._context import TaskContext, TaskModule, TaskSelection, outermost
from .linear import TaskLinear
from .perturbed import PerturbedLayer
from .stand_ins import StandIn

#: projection name → (weight path, bias path or None) inside the wrapped module
Paths = dict[str, tuple[str, str | None]]


def _pop_parameter(module: nn.Module, path: str) -> nn.Parameter | None:
    owner_name, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if owner._parameters.get(leaf) is None:  # absent, or registered as None (a layer without bias): left as it is
        return None
    return owner._parameters.pop(leaf)


class TaskReparametrized(TaskModule):
    """Wraps ``inner``, a module that reads the weights of its projections itself, so that task ``t`` runs it with
    ``W_t = diag(r) W diag(s) + U Vᵀ`` and ``b_t`` in place of each projection's weight and bias
    (set as plain attributes of their owners for the call; merged weights cached in inference, with autograd in
    training).

    ``projections[name]`` is a :class:`TaskLinear` (``projection``; a :class:`TaskConv2d` for a convolution that
    runs its own forward, see :mod:`~halrp_fast.nn.subclasses`) holding the base weight ``(out, in)`` and bias
    (removed from ``inner``) and the per-task tensors; it takes part in rank allocation, pruning and checkpoints like
    any other task-aware layer.  Task-aware modules inside ``inner`` (e.g. a position-bias MLP) run as the task selects.
    A mixed batch runs ``inner`` once per task group on that group's rows: ``batch_dims(args, kwargs)`` says where
    each input tensor's batch dimension is (``None``: shared by all rows), ``out_batch_dims`` the outputs'.
    Task 0 is the original module with its original tensors, exactly.
    """

    def __init__(self, inner: nn.Module, paths: Paths, ctx: TaskContext | None = None,
                 batch_dims: Callable | None = None, out_batch_dims: Callable | None = None,
                 projection: Callable[..., PerturbedLayer] = TaskLinear) -> None:
        super().__init__(ctx)
        self.inner = inner
        self.paths = dict(paths)
        self.projections = nn.ModuleDict()
        dims = getattr(projection, "func", projection).weight_dims  # a class, or a functools.partial of one
        for name, (weight_path, bias_path) in self.paths.items():
            weight = _pop_parameter(inner, weight_path)
            bias = _pop_parameter(inner, bias_path) if bias_path else None
            if weight is None or weight.dim() != dims:
                raise ValueError(f"{type(inner).__name__}.{weight_path} is not a {dims}-D weight parameter")
            self.projections[name] = projection(weight, bias, ctx=ctx)
            if bias is None:
                self.paths[name] = (weight_path, None)
        self._batch_dims = batch_dims or _leading_batch_dims
        self._out_batch_dims = out_batch_dims or _OutputDims(0)
        #: path → (the module inside ``inner`` that owns it, attribute name), resolved once: every call places the
        #: task's tensors there (``get_submodule`` per path per call cost ~2 µs each)
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        for path in (p for pair in self.paths.values() for p in pair if p is not None):
            owner_name, _, leaf = path.rpartition(".")
            self._owners[path] = (inner.get_submodule(owner_name) if owner_name else inner, leaf)
        self._serving = DerivedCache(TaskLinear.merge_cache_size)

    # ---------------------------------------------------------------- tasks (the projections hold the tensors)
    def add_task(self) -> int:
        self.num_tasks += 1
        return self.num_tasks - 1

    def remove_last_task(self) -> None:
        self._check_removable()
        self.num_tasks -= 1
        self.clear_caches()

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Task 0: the wrapped module's own parameters (e.g. a relative position bias table; the projections and
        task-aware modules inside report theirs); later tasks own nothing here."""
        if self._check_task(t) != 0:
            return []
        nested = {id(p) for m in self.inner.modules() if isinstance(m, TaskModule) for p in m.parameters()}
        return [p for p in self.inner.parameters() if id(p) not in nested]

    def _tensors(self, t: int) -> dict[str, torch.Tensor]:
        out = {}
        projections = self.projections._modules
        for name, (weight_path, bias_path) in self.paths.items():
            weight, bias = projections[name].task_weight(t)
            out[weight_path] = weight
            if bias_path is not None:
                out[bias_path] = bias
        return out

    def to_plain(self, t: int) -> nn.Module:
        """The original module holding task ``t``'s weights (task-aware modules inside it made plain too)."""
        plain = copy.deepcopy(self.inner)
        nested = {n: m for n, m in plain.named_modules() if n and isinstance(m, TaskModule)}
        for name in outermost(nested):
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name) if parent_name else plain, child, nested[name].to_plain(t))
        with torch.no_grad():
            for path, value in self._tensors(t).items():
                owner_name, _, leaf = path.rpartition(".")
                owner = plain.get_submodule(owner_name) if owner_name else plain
                owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        return plain

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        sel = self._ctx.selection
        if sel is None:
            raise ValueError(f"{type(self.inner).__name__} (task-aware) runs inside the TaskModel that holds it: call "
                             f"model(x, task_ids)")
        watch = self._ctx.watch
        if watch is not None and not torch.compiler.is_compiling():
            watch["ran"].update([p.layer_name or type(p).__name__ for p in self.projections._modules.values()])
        if sel.single is not None:
            return self._run(sel.single, args, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        dims = self._leaf_dims(args, kwargs, leaves)
        parts = []
        for i, t in enumerate(sel.tasks):
            taken = [self._take(sel, v, d, i) for v, d in zip(leaves, dims, strict=True)]
            group_args, group_kwargs = tree_unflatten(taken, spec)
            with self._ctx.use(TaskSelection(single=t)):
                parts.append(self._run(t, group_args, group_kwargs))
        return self._join(sel, parts)

    def _serving_tensors(self, t: int) -> dict[str, torch.Tensor]:
        """:meth:`_tensors` of a later task for a call without autograd, each requiring grad, cached while the
        projections' tensors are unchanged (one check of them all instead of one merged-weight lookup per projection).

        Without autograd the flag changes nothing but torch.matmul's choice for a non-contiguous 3-D input (MHA's
        transposed query): with a weight that requires grad it folds the batch into one mm, as for the original
        module's parameters; with a plain tensor it takes bmm (measured 396 against 320 µs per in-projection of a
        12-layer ViT on CPU)."""
        return self._serving.get(t, self._sources(t), lambda: _requiring_grad(self._tensors(t)))

    def _sources(self, t: int) -> list[torch.Tensor | None]:
        """What task ``t`` of every projection derives from (:meth:`PerturbedLayer.task_sources`, in order)."""
        sources = []
        for layer in self.projections._modules.values():
            sources += layer.task_sources(t)
        return sources

    def clear_caches(self) -> None:
        """Forget the prepared weights (the projections keep their own caches: clear those too)."""
        self._serving.clear()
        self._ctx.generation += 1

    def _apply(self, fn, recurse=True):
        self.clear_caches()
        return super()._apply(fn, recurse)

    def _run(self, t: int, args, kwargs):
        # The tensors become plain attributes of their owners for the call (the parameters were removed from the
        # modules, so nothing else answers these names).  Eagerly they go straight into the instance dicts
        # (Module.__setattr__ would register a Parameter and cost ~4 µs each; functional_call's generic swapping
        # ~0.1 ms per call); under torch.compile through setattr, which dynamo traces (functional_call fails its
        # guards on the removed parameters).
        compiling = torch.compiler.is_compiling()
        placed = []
        try:
            for path, value in self._call_tensors(t).items():
                owner, leaf = self._owners[path]
                if compiling:
                    setattr(owner, leaf, value)
                else:
                    owner.__dict__[leaf] = value
                placed.append((owner, leaf))
            return self.inner(*args, **kwargs)
        finally:
            for owner, leaf in placed:
                if compiling:
                    delattr(owner, leaf)
                else:
                    owner.__dict__.pop(leaf, None)

    def _call_tensors(self, t: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s weights and biases by path, prepared for the call in progress."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._tensors(t)
        if t == 0:  # the original parameters (frozen ones too, for the same matmul choice)
            return _requiring_grad(self._tensors(0))
        return self._serving_tensors(t)

    # ---------------------------------------------------------------- stand-in: ``inner`` with the task's weights
    has_stand_in = stands_in_per_call = True

    def stand_in(self, t: int, constant: bool) -> StandIn:
        """``inner`` with task ``t``'s weights placed, prepared as for a call without autograd (a forward that turns
        autograd on inside itself would not reach the task's parameters)."""
        places = [(*self._owners[path], value) for path, value in self._call_tensors(t).items()]
        return StandIn(self.inner, places, tuple(self._sources(t)) if constant else ())

    def stand_in_tree(self) -> nn.Module:
        return self.inner

    def _leaf_dims(self, args, kwargs, leaves) -> list[int | None]:
        dims = self._batch_dims(args, kwargs)
        if len(dims) != len(leaves):
            raise RuntimeError(f"batch_dims gave {len(dims)} entries for {len(leaves)} inputs")
        return dims

    @staticmethod
    def _take(sel: TaskSelection, value, dim: int | None, i: int):
        if dim is None or not isinstance(value, torch.Tensor):
            return value
        if dim == 0:
            return sel.rows(value, i)
        return sel.rows(value.transpose(0, dim), i).transpose(0, dim)

    def _join(self, sel: TaskSelection, parts: list):
        flat = [tree_flatten(p) for p in parts]
        spec = flat[0][1]
        dims = self._out_batch_dims(parts[0])
        leaves = []
        for j, first in enumerate(flat[0][0]):
            if not isinstance(first, torch.Tensor):
                leaves.append(first)
                continue
            dim = dims[j] if isinstance(dims, (list, tuple)) else dims
            column = [f[0][j] if dim == 0 else f[0][j].transpose(0, dim) for f in flat]
            joined = sel.regroup(column)
            leaves.append(joined if dim == 0 else joined.transpose(0, dim))
        return tree_unflatten(leaves, spec)

    def extra_repr(self) -> str:
        return f"projections={list(self.paths)}, tasks={self.num_tasks}"

    def __repr__(self) -> str:
        """Printed with the base's tensors in place (a projection's module, e.g. MHA's ``out_proj``, prints its
        weight's presence)."""
        placed = []
        try:
            for path, value in self._tensors(0).items():
                owner, leaf = self._owners[path]
                owner.__dict__[leaf] = value
                placed.append((owner, leaf))
            return super().__repr__()
        finally:
            for owner, leaf in placed:
                owner.__dict__.pop(leaf, None)

    def __getattr__(self, name: str):
        """What code around the wrapped module reads of it: its plain attributes (``nn.MultiheadAttention``'s
        ``batch_first``, ``num_heads``, ... that ``nn.TransformerEncoderLayer`` checks) and, under their old names,
        the base tensors its projections hold (a read of them is noted like any read of a converted layer's weight:
        an error when the wrapper does not run in that forward)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            d = self.__dict__
            modules, paths = d.get("_modules", {}), d.get("paths")
            if name.startswith("__") or "inner" not in modules or paths is None:  # not built (yet): copying, pickling
                raise
        inner = modules["inner"]
        for store in (inner.__dict__, inner._parameters, inner._buffers):  # e.g. an in_proj_bias that is None
            if name in store and not isinstance(store[name], torch.Tensor):
                return store[name]
        for proj, (weight_path, bias_path) in paths.items():
            if name in (weight_path, bias_path):
                return getattr(modules["projections"]._modules[proj], "weight" if name == weight_path else "bias")
        raise AttributeError(f"'{type(self).__name__}' (wrapping {type(inner).__name__}) has no attribute '{name}'")


def exported_name(name: str, wrappers: Iterable[str]) -> str:
    """``name`` (a module, parameter or buffer path in a converted model) as it is in the model that
    ``TaskModel.export_task`` gives: the ``inner`` level of a wrapper (a :class:`TaskReparametrized` named in
    ``wrappers``) is gone there."""
    for w in wrappers:
        prefix = f"{w}.inner."
        if name.startswith(prefix):
            return f"{w}.{name[len(prefix):]}"
    return name


def _requiring_grad(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each one that does not require grad replaced by a detached alias that does (no copy; see
    :meth:`TaskReparametrized._serving_tensors` for why, in calls without autograd)."""
    return {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in tensors.items()}


def _leading_batch_dims(args, kwargs) -> list[int | None]:
    """Every tensor input has its batch dimension first."""
    return [0 if isinstance(v, torch.Tensor) else None for v in tree_flatten((args, kwargs))[0]]


# ------------------------------------------------------------------------------------------------
# the modules known to read their projections' weights
# ------------------------------------------------------------------------------------------------
def _mha_wrapper(mha: nn.MultiheadAttention, ctx: TaskContext) -> TaskReparametrized:
    """``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj`` perturbed.

    Batch dimensions: query/key/value at 0 (``batch_first``) or 1, ``key_padding_mask`` at 0; a 3-D ``attn_mask``
    ``(N·heads, L, S)`` holds each sample's heads together; outputs: the attention output as the query, the weights at
    0."""
    if mha._qkv_same_embed_dim:
        paths: Paths = {"in_proj": ("in_proj_weight", "in_proj_bias")}
    else:  # separate q/k/v weights; their bias stays the shared in_proj_bias
        paths = {n: (f"{n}_weight", None) for n in ("q_proj", "k_proj", "v_proj")}
    paths["out_proj"] = ("out_proj.weight", "out_proj.bias")
    seq_dim = 0 if mha.batch_first else 1
    return TaskReparametrized(mha, paths, ctx, _MHABatchDims(seq_dim), _OutputDims([seq_dim, 0]))


class _OutputDims:
    """``out_batch_dims`` that are the same for every call (a class, not a closure: a converted model pickles)."""

    def __init__(self, dims) -> None:
        self.dims = dims

    def __call__(self, out):
        return self.dims


class _MHABatchDims:
    """``batch_dims`` of ``nn.MultiheadAttention.forward``'s arguments (``seq_dim``: 0 for batch-first inputs, else
    1)."""

    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")

    def __init__(self, seq_dim: int) -> None:
        self.seq_dim = seq_dim

    def __call__(self, args, kwargs) -> list[int | None]:
        dims = []
        for name, value in list(zip(self.names, args, strict=False)) + list(kwargs.items()):
            if not isinstance(value, torch.Tensor):
                dims.append(None)
            elif name in ("query", "key", "value"):
                dims.append(self.seq_dim if value.dim() == 3 else None)
            elif name == "key_padding_mask":
                dims.append(0 if value.dim() == 2 else None)
            elif name == "attn_mask" and value.dim() == 3:
                raise NotImplementedError("a 3-D attn_mask in a mixed-task batch is not supported; pass a 2-D mask "
                                          "or run the tasks separately")
            else:
                dims.append(None)
        return dims


#: a switched-off fused path: (qualified module name, attribute, its original value)
FastPath = tuple[str, str, object]
#: the value of each attribute that switches a fused path off
_OFF = {"activation_relu_or_gelu": 0, "use_nested_tensor": False}


def fast_paths_off(model: nn.Module) -> list[FastPath]:
    """Switch off PyTorch's fused inference paths of ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in
    ``model`` where the attention is wrapped, and return what was switched (for :func:`fast_paths_as_built`): they
    pass the projections' and feed-forward layers' weights to one fused kernel
    (``torch._transformer_encoder_layer_fwd``), which would compute the base for every task.  The layers then take
    their standard path (attention and feed-forward modules called in turn: the same values up to rounding, except at
    padded positions, where the fused path gives zeros).  An encoder layer takes the fused path only when its
    activation is ReLU or GELU (``activation_relu_or_gelu``, read by nothing else); an encoder stack converts to
    nested tensors only when ``use_nested_tensor``."""
    switched: list[FastPath] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, TaskReparametrized):
            attr = "activation_relu_or_gelu"
        elif isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, TaskReparametrized) for layer in module.layers
                if isinstance(layer, nn.TransformerEncoderLayer)):
            attr = "use_nested_tensor"
        else:
            continue
        switched.append((name, attr, getattr(module, attr)))
        setattr(module, attr, _OFF[attr])
    return switched


def sequence_first_layers(model: nn.Module) -> list[str]:
    """The ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` modules of ``model`` built with
    ``batch_first=False``: their linear and norm layers see ``(sequence, batch, features)``."""
    kinds = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return [name for name, m in model.named_modules() if isinstance(m, kinds) and not m.self_attn.batch_first]


@contextmanager
def fast_paths_as_built(model: nn.Module, switched: list[FastPath]) -> Iterator[None]:
    """Inside, the fused paths that :func:`fast_paths_off` switched off in ``model`` are as the model was built (for
    the base, whose weights they read, and for a plain exported model)."""
    owners = [(model.get_submodule(name), attr, value) for name, attr, value in switched]
    for owner, attr, value in owners:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, _ in owners:
            setattr(owner, attr, _OFF[attr])


def _swin_attention_wrapper(module: nn.Module, ctx: TaskContext) -> TaskReparametrized:
    """torchvision's ``ShiftedWindowAttention`` / ``V2``: ``qkv`` and ``proj`` (passed to
    ``shifted_window_attention``); input ``(B, H, W, C)``."""
    return TaskReparametrized(module, {"qkv": ("qkv.weight", "qkv.bias"), "proj": ("proj.weight", "proj.bias")}, ctx)


def reparametrized_wrapper(module: nn.Module) -> Callable[[nn.Module, TaskContext], TaskReparametrized] | None:
    """How to make ``module`` task-aware when its code reads its projections' weights; ``None`` for other modules."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_wrapper
    cls = type(module)
    if cls.__module__ == "torchvision.models.swin_transformer" and cls.__name__.startswith("ShiftedWindowAttention"):
        return _swin_attention_wrapper
    return None


def projection_modules(module: nn.Module) -> set[str]:
    """Qualified names (relative to ``module``) of submodules that a wrapper takes over entirely (e.g. ``out_proj``):
    not converted on their own."""
    if isinstance(module, nn.MultiheadAttention):
        return {"out_proj"}
    if reparametrized_wrapper(module) is _swin_attention_wrapper:
        return {"qkv", "proj"}
    return set()
