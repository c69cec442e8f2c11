"""What task-aware linear and conv layers share (:class:`PerturbedLayer`; the layers themselves are in
``linear.py`` and ``conv.py``): one frozen base weight, per-task ``r, s, U, V`` and bias.

Task 0 is the base itself (``r = s = 1``, no low-rank term, the base bias).  Task ``t ≥ 1`` computes
``y = r_t ⊙ op(s_t ⊙ x, W) + U_t (V_tᵀ x) + b_t``; its rank ``k`` (columns of ``U_t``/``V_t``) may be
0 and differs per task and per layer.

Per-task tensors live in ``ParameterDict``\\ s keyed by the task number (``r.3``, ``U.3``, ...), so a
state dict names them plainly; loading a state dict whose ranks differ from the current ones
resizes ``U``/``V`` to the stored ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ._cache import DerivedCache, tensor_key
from ._context import TaskContext, TaskModule, TaskSelection
from .stand_ins import StandIn

_PER_TASK = ("r", "s", "U", "V", "task_bias", "allocated")
_BASE_TENSORS = frozenset(("weight", "bias"))


class _RankBook(nn.Module):
    """Per-task 0-d int64 buffers named by task: the rank each task was allocated before pruning."""

    def set(self, t: int, k: int, device) -> None:
        self.register_buffer(str(t), torch.tensor(k, dtype=torch.int64, device=device))

    def get(self, t: int) -> int:
        return int(getattr(self, str(t)))


def _as_parameter(t: torch.Tensor) -> nn.Parameter:
    """Keep the caller's Parameter object (optimisers holding it stay valid); wrap a plain tensor."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=t.requires_grad)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class PerturbedLayer(TaskModule):
    """Shared machinery of :class:`TaskLinear` and :class:`TaskConv2d`.

    Attributes: ``weight`` (the base, task 0), ``bias`` (task 0's bias or ``None``), and per task
    ``t ≥ 1``: ``r[str(t)] (out,)``, ``s[str(t)] (in,)``, ``U[str(t)] (out, k)``, ``V[str(t)] (in, k)``,
    ``task_bias[str(t)] (out,)`` (absent when the base has no bias).

    ``merge_cache_size`` bounds the number of merged task weights kept for inference (LRU).
    """

    merge_cache_size: int = 8
    _task_containers = _PER_TASK
    #: the number of dimensions of the weight: ``(out, in)``, or a conv's ``(out, in/groups, kh, kw)``
    weight_dims: int = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ctx: TaskContext | None = None) -> None:
        super().__init__(ctx)
        self.weight = _as_parameter(weight)
        self.bias = None if bias is None else _as_parameter(bias)
        for name in _PER_TASK[:-1]:
            setattr(self, name, nn.ParameterDict())
        self.allocated = _RankBook()
        self._merged = DerivedCache(self.merge_cache_size)
        self._banks = DerivedCache(2)

    # ---------------------------------------------------------------- sizes
    @property
    def out_features(self) -> int:
        return self._parameters["weight"].shape[0]

    @property
    def in_features(self) -> int:
        return self._parameters["weight"].shape[1]

    def rank(self, t: int) -> int:
        """Rank of task ``t``'s perturbation (0 for the base)."""
        self._check_task(t)
        return 0 if t == 0 else self.U[str(t)].shape[1]

    def allocated_rank(self, t: int) -> int:
        """The rank task ``t`` was given by :meth:`set_rank` before pruning dropped any column."""
        self._check_task(t)
        return 0 if t == 0 else self.allocated.get(t)

    # ---------------------------------------------------------------- tasks
    def add_task(self) -> int:
        """Add a task initialised to the base (r = s = 1, rank 0, bias copied); returns its id."""
        t, w = self.num_tasks, self.weight
        opts = dict(dtype=w.dtype, device=w.device)
        self.r[str(t)] = nn.Parameter(torch.ones(self.out_features, **opts))
        self.s[str(t)] = nn.Parameter(torch.ones(self.in_features, **opts))
        self.U[str(t)] = nn.Parameter(torch.zeros(self.out_features, 0, **opts))
        self.V[str(t)] = nn.Parameter(torch.zeros(self.in_features, 0, **opts))
        if self.bias is not None:
            self.task_bias[str(t)] = nn.Parameter(self.bias.detach().clone())
        self.allocated.set(t, 0, w.device)
        self.num_tasks += 1
        return t

    def remove_last_task(self) -> None:
        key = str(self._check_removable())
        for name in ("r", "s", "U", "V", "task_bias"):
            container = getattr(self, name)
            if key in container:
                del container[key]
        delattr(self.allocated, key)
        self.num_tasks -= 1
        self.clear_caches()

    def task_tensors(self, t: int) -> tuple[torch.Tensor, ...]:
        """``(r, s, U, V, bias)`` of task ``t``; for task 0 the identity scales and an empty rank."""
        self._check_task(t)
        if t == 0:
            w = self.weight
            opts = dict(dtype=w.dtype, device=w.device)
            return (torch.ones(self.out_features, **opts), torch.ones(self.in_features, **opts),
                    torch.zeros(self.out_features, 0, **opts), torch.zeros(self.in_features, 0, **opts), self.bias)
        k = str(t)
        return self.r[k], self.s[k], self.U[k], self.V[k], self.task_bias[k] if self.bias is not None else None

    def tensors_of_tasks(self, tasks: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """:meth:`task_tensors` of each of ``tasks`` (ids already checked, as a :class:`TaskSelection`'s are),
        reading every per-task container's entries directly: a mixed batch asks for them in every layer."""
        if 0 in tasks:
            return [self.task_tensors(t) for t in tasks]
        containers = self._modules
        r, s, U, V, b = (containers[name]._parameters for name in _PER_TASK[:5])
        if self._parameters.get("bias") is None:  # no bias: a plain None attribute
            return [(r[k], s[k], U[k], V[k], None) for k in map(str, tasks)]
        return [(r[k], s[k], U[k], V[k], b[k]) for k in map(str, tasks)]

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """What trains for task ``t``: the base weight and bias for task 0, else ``r, s, U, V, bias``."""
        self._check_task(t)
        if t == 0:
            return [p for p in (self.weight, self.bias) if p is not None]
        return [p for p in self.task_tensors(t) if p is not None]

    def set_rank(self, t: int, U: torch.Tensor, V: torch.Tensor, pruned: bool = False) -> None:
        """Replace task ``t``'s perturbation by ``U (out, k)``, ``V (in, k)`` (copied; k may be 0).

        ``pruned=True`` marks a rank reduction by pruning: the allocated rank stays as it was.
        """
        self._check_task(t, allow_base=False)
        _checks.check_like("U", U, self.weight, "weight")
        _checks.check_like("V", V, self.weight, "weight")
        _checks.check_lowrank_pair(U, V, self.out_features, self.in_features, None)
        key = str(t)
        grad = self.U[key].requires_grad
        self.U[key] = nn.Parameter(U.detach().clone(), requires_grad=grad)
        self.V[key] = nn.Parameter(V.detach().clone(), requires_grad=grad)
        if not pruned:
            self.allocated.set(t, U.shape[1], self.weight.device)
        self.clear_caches()

    def clear_caches(self) -> None:
        self._merged.clear()
        self._banks.clear()
        self._ctx.generation += 1  # what a serving session prepared from this layer is stale too

    def _apply(self, fn, recurse=True):
        self.clear_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Ranks are data: resize U/V to the stored rank before the values are copied in.
        for name in ("U", "V"):
            bank = getattr(self, name)
            for key in list(bank.keys()):
                stored = state_dict.get(f"{prefix}{name}.{key}")
                if isinstance(stored, torch.Tensor) and stored.shape != bank[key].shape and stored.dim() == 2 \
                        and stored.shape[0] == bank[key].shape[0]:
                    old = bank[key]
                    bank[key] = nn.Parameter(old.new_empty(stored.shape), requires_grad=old.requires_grad)
        self.clear_caches()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---------------------------------------------------------------- merged weights
    def merged_weight(self, t: int) -> torch.Tensor:
        """``diag(r) W diag(s) + U Vᵀ`` of task ``t`` (no autograd; cached until a parameter changes)."""
        self._check_task(t)
        if t == 0:
            return self.weight.detach()
        r, s, U, V, _ = self.task_tensors(t)
        return self._merged.get(t, (self.weight, r, s, U, V), lambda: self._merge(self.weight, r, s, U, V))

    def _merged_weights(self, tasks: list[int], per_task) -> list[torch.Tensor]:
        """Merged weights of ``tasks`` (``per_task`` their :meth:`task_tensors`): cached ones reused, the others
        merged together in one batched pass and cached."""
        sources = [(self.weight, *tensors[:4]) for tensors in per_task]
        keys = [None if t == 0 else tensor_key(src) for t, src in zip(tasks, sources, strict=True)]
        weights = [self.weight.detach() if t == 0 else self._merged.lookup(t, src, key)
                   for t, src, key in zip(tasks, sources, keys, strict=True)]
        missing = [i for i, w in enumerate(weights) if w is None]
        if not missing:
            return weights
        with torch.inference_mode(False), torch.no_grad():
            if len(missing) == 1:
                merged = [self._merge(*sources[missing[0]])]
            else:
                R, S, U, V, _ = self._stack([per_task[i] for i in missing], with_bias=False)
                merged = self._merge(self.weight, R, S, U, V).unbind(0)
        for i, w in zip(missing, merged, strict=True):
            weights[i] = w
            self._merged.put(tasks[i], sources[i], w, keys[i])
        return weights

    def task_weight(self, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Task ``t``'s weight and bias as a plain layer holds them: the base's for task 0; else the merged weight,
        cached when no gradient is needed, or computed with autograd (for code that reads the weight itself)."""
        params = self._parameters
        if self._check_task(t) == 0:
            return params["weight"], params.get("bias")
        sources, b = self._single_task_tensors(t)
        if self._can_merge(sources):
            return self._merged.get(t, sources, lambda: self._merge(*sources)), b
        return self._merge(*sources), b

    #: whether a plain layer of this kind stores the weight transposed, ``(in, out)`` (transformers' ``Conv1D``)
    plain_transposed = False

    def merge_as_plain(self, weight, r, s, U, V) -> torch.Tensor:
        """``diag(r) W diag(s) + U Vᵀ`` from the given tensors (with autograd), laid out as this layer's plain form
        (:meth:`to_plain`) holds its weight."""
        w = self._merge(weight, r, s, U, V)
        return w.T if self.plain_transposed else w

    def _can_merge(self, tensors) -> bool:
        """The merged weight serves when no gradient w.r.t. the layer's parameters (``None``: no bias) is needed."""
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in tensors):
            return False
        return not _is_compiling()

    # ---------------------------------------------------------------- reads behind the layer's back
    def __getattr__(self, name: str):
        """Parameters and submodules as ``nn.Module`` gives them; besides, a read of ``weight``/``bias`` while a later
        task runs is recorded: if the layer's own forward does not run in that pass (e.g. attention that passes
        ``self.qkv.weight`` to a function), that code computed the base for every task, and :class:`TaskModel`
        raises (reading only metadata such as the weight's dtype, next to calling the layer, is harmless; the
        layer's own forward reads its tensors from ``_parameters``)."""
        value = super().__getattr__(name)
        if name in _BASE_TENSORS:
            d = self.__dict__
            ctx = d.get("_ctx")
            if ctx is not None and ctx.watch is not None:
                ctx.watch["read"].add(d.get("layer_name") or type(self).__name__)
        return value

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        """``x`` → this layer's output for task ``task_ids`` (int or ``(M,)`` int64; default: the
        selection of the enclosing :class:`TaskModel`)."""
        ctx = self._ctx
        watch = ctx.watch
        if watch is not None and not torch.compiler.is_compiling():
            watch["ran"].add(self.layer_name or type(self).__name__)
        sel = self._selection(task_ids, x)
        if sel.single is not None:  # the serving path: as few Python steps as the checks allow
            self._check_input(x)
            return self._forward_single(x, sel.single)
        if not sel.holds_grouped(x):
            self._check_input(x)
            sel.check_rows(x, f"layer {self.layer_name!r}")
            return self._forward_mixed(x, sel)
        out = self._forward_grouped(x, sel)
        if out is not None:
            return out
        out = self._forward_mixed(sel.grouped.ungroup(x), sel)
        # A conv's output goes back into the grouped layout, so that both branches of a residual sum agree.
        return sel.grouped.group(out) if self._keeps_grouped_layout else out

    #: the layer's qualified name in its TaskModel (for errors), set by the model
    layer_name = ""

    def _check_input(self, x: torch.Tensor) -> None:
        """A ValueError naming the layer when ``x`` cannot be its input (instead of a bare matmul/conv error)."""

    def _input_error(self, x: torch.Tensor, expected: str) -> ValueError:
        where = f"layer {self.layer_name!r}" if self.layer_name else type(self).__name__
        return ValueError(f"{where} takes inputs with {expected}, got shape {tuple(x.shape)}: is the input the size "
                          f"(and channel count) the network was built for?")

    def _single_task_tensors(self, t: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``(W, r, s, U, V)`` and the bias of task ``t ≥ 1`` (id already checked), read from the containers
        directly: the reads of :meth:`tensors_of_tasks` for one task, on the hot path of every forward."""
        params, key, containers = self._parameters, str(t), self._modules
        sources = (params["weight"], containers["r"]._parameters[key], containers["s"]._parameters[key],
                   containers["U"]._parameters[key], containers["V"]._parameters[key])
        b = containers["task_bias"]._parameters[key] if params.get("bias") is not None else None
        return sources, b

    def task_sources(self, t: int) -> tuple[torch.Tensor | None, ...]:
        """Every tensor task ``t`` (id already checked) is derived from: the weight and bias for task 0, else
        ``W, r, s, U, V`` and the task's bias (``None``: no bias)."""
        if t == 0:
            return self._parameters["weight"], self._parameters.get("bias")
        weights, bias = self._single_task_tensors(t)
        return (*weights, bias)

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if t == 0:  # no bias: a plain None attribute
            return self._plain(x, self._parameters["weight"], self._parameters.get("bias"))
        sources, b = self._single_task_tensors(t)  # t was checked by the selection
        if self._can_merge(sources):
            return self._plain(x, self._merged.get(t, sources, lambda: self._merge(*sources)), b)
        return self._op(x, *sources[1:], b)

    def _forward_mixed(self, x: torch.Tensor, sel: TaskSelection) -> torch.Tensor:
        per_task = self.tensors_of_tasks(sel.tasks)
        sources = [self.weight] + [p for tensors in per_task for p in tensors]
        if not self._can_merge(sources):
            return self._op_mt(x, sel.local_ids, *self._stack(per_task))
        kmax = max(t[2].shape[1] for t in per_task)
        merge_cost, lowrank_cost = self._mixed_costs(x, len(per_task), kmax)
        if merge_cost < lowrank_cost:
            # Inference: each task group through its merged weight (the dense cost), when merging the groups'
            # weights and moving their rows costs less than the per-sample low-rank work of the mixed op.
            return self._mixed_through_merged(x, sel, per_task)
        banks = self._banks.get(tuple(sel.tasks), sources, lambda: self._stack(per_task))
        return self._op_mt(x, sel.local_ids, *banks)

    def _mixed_through_merged(self, x: torch.Tensor, sel: TaskSelection, per_task) -> torch.Tensor:
        """A mixed batch in inference, each task group through its cached merged weight (``per_task``: the tasks'
        :meth:`task_tensors`)."""
        weights = self._merged_weights(sel.tasks, per_task)
        return sel.regroup([self._plain(sel.rows(x, i), w, tensors[4])
                            for i, (w, tensors) in enumerate(zip(weights, per_task, strict=True))])

    #: whether an output computed in the row layout returns to the grouped layout (image layers do; a linear
    #: layer's output stays in rows, as does everything after it)
    _keeps_grouped_layout = False

    def _forward_grouped(self, x: torch.Tensor, sel: TaskSelection) -> torch.Tensor | None:
        """This layer on an activation in the batch's grouped layout, or ``None`` when it has no grouped form
        (then ``x`` moves to the row layout)."""
        return None

    def _mixed_costs(self, x: torch.Tensor, tasks: int, k: int) -> tuple[float, float]:
        """Multiply-adds beyond the dense product of a mixed inference batch ``x``: ``(merged weights per
        task group, incl. moving the rows; the mixed op's low-rank and scaling work)``."""
        raise NotImplementedError

    @staticmethod
    def _stack(per_task, with_bias: bool = True):
        """Banks ``R (T, out)``, ``S (T, in)``, ``U (T, out, kmax)``, ``V (T, in, kmax)``, ``B (T, out)``
        (``None`` without bias or when not ``with_bias``); ranks below ``kmax`` zero-padded."""
        rs, ss, Us, Vs, bs = zip(*per_task, strict=True)
        ranks = [u.shape[1] for u in Us]
        kmax = max(ranks)
        R, S = torch.stack(rs), torch.stack(ss)
        if min(ranks) == kmax:
            U, V = torch.stack(Us), torch.stack(Vs)
        else:
            U = torch.stack([F.pad(u, (0, kmax - u.shape[1])) for u in Us])
            V = torch.stack([F.pad(v, (0, kmax - v.shape[1])) for v in Vs])
        B = None if bs[0] is None or not with_bias else torch.stack(bs)
        return R, S, U, V, B

    # ---------------------------------------------------------------- stand-in (a serving session's)
    has_stand_in = True

    def stand_in(self, t: int, constant: bool) -> StandIn | None:
        """For a serving session: task ``t`` as a plain layer of this kind holding its merged weight (outside one,
        the layer runs itself: its merged-weight cache costs the same as a stand-in would)."""
        if not constant:
            return None
        weight, bias = self.task_weight(t)
        return StandIn(_MergedStandIn(self, weight, bias), sources=self.task_sources(t))

    # ---------------------------------------------------------------- per-kind hooks
    def _plain(self, x, weight, bias):
        raise NotImplementedError

    def _op(self, x, r, s, U, V, bias):
        raise NotImplementedError

    def _op_mt(self, x, local_ids, R, S, U, V, B):
        raise NotImplementedError

    def _merge(self, weight, r, s, U, V):
        raise NotImplementedError

    def to_plain(self, t: int) -> nn.Module:
        """An ordinary ``nn.Linear``/``nn.Conv2d`` holding task ``t``'s merged weight and bias."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, tasks={self.num_tasks}"


class _MergedStandIn(nn.Module):
    """One task of ``layer`` as a plain layer: ``layer``'s own op (``F.linear``, ``F.conv2d`` with its stride,
    padding and groups) on a prepared weight and bias.  Every other attribute is read from ``layer``; a forward
    still counts as the layer's for the checks of reads behind its back."""

    def __init__(self, layer: PerturbedLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        d = self.__dict__
        d["source"], d["weight"], d["bias"], d["ctx"], d["plain"] = layer, weight, bias, layer._ctx, layer._plain
        d["name"] = layer.layer_name or type(layer).__name__
        del d["training"]  # read from the layer, as every other attribute

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        d = self.__dict__
        if task_ids is not None:
            return d["source"](x, task_ids)
        watch = d["ctx"].watch
        if watch is not None:
            watch["ran"].add(d["name"])
        try:
            return d["plain"](x, d["weight"], d["bias"])
        except RuntimeError:
            d["source"]._check_input(x)  # the library's error naming the layer, when the input is the cause
            raise

    def __getattr__(self, name: str):
        return getattr(self.__dict__["source"], name)

    def extra_repr(self) -> str:
        return f"stand-in of {self.__dict__['name']}"
