"""Task selection shared by the task-aware modules of one model.

A :class:`TaskModel` resolves its ``task_ids`` argument once per forward into a
:class:`TaskSelection` and publishes it on a :class:`TaskContext` that every task-aware module of
the model holds, so an unmodified user ``forward`` (which calls ``self.conv1(x)`` with one argument)
still routes every layer to the right task.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .._math import layout_of


def outermost(names) -> list[str]:
    """The qualified module names of ``names`` that lie below no other of them (in their order)."""
    names = list(names)
    return [n for n in names if not any(n.startswith(p + ".") for p in names if p != n)]


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 in ``x``'s memory layout (``index_select`` returns a contiguous tensor, which turns
    a channels-last activation into NCHW and makes every following layer convert it back)."""
    return x[index]


@dataclass(frozen=True)
class GroupedLayout:
    """A mixed batch with its task groups side by side along the channels.

    The row layout ``(M, C, ...)`` (rows sorted by task) becomes ``(m, G·C, ...)``: group ``g`` (the
    selection's ``g``-th task) holds channels ``g·C … (g+1)·C − 1``, and its samples are rows ``0 … n_g − 1``
    (``m`` = the largest group; the rows past a smaller group's end are zeros).  A network whose operations
    outside its task-aware layers act on each channel separately (ReLU, pooling, dropout, residual sums)
    then runs every task group of a layer in one grouped convolution.  ``group_of_row``/``slot_of_row
    (M,)`` place the sorted rows when the groups differ in size (``None`` when they are all ``m``).
    """

    groups: int
    rows: int
    group_of_row: torch.Tensor | None = None
    slot_of_row: torch.Tensor | None = None

    @property
    def padded(self) -> bool:
        return self.group_of_row is not None

    def holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is an activation in this layout (its batch dimension is ``m``, not ``M``)."""
        return x.dim() >= 2 and x.shape[0] == self.rows and x.shape[1] % self.groups == 0

    def _groups_view(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, G·C, ...)`` → a view ``(G, m, C, ...)``."""
        return x.unflatten(1, (self.groups, -1)).transpose(0, 1)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """Rows sorted by task ``(M, C, ...)`` → ``(m, G·C, ...)`` (one copy; channels-last stays so)."""
        g, m = self.groups, self.rows
        out_shape = (m, g * x.shape[1], *x.shape[2:])
        fmt = layout_of(x)
        if self.padded:
            out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
            self._groups_view(out).index_put_((self.group_of_row, self.slot_of_row), x)
        else:
            out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt)
            self._groups_view(out).copy_(x.unflatten(0, (g, m)))
        return out

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, G·C, ...)`` → rows sorted by task ``(M, C, ...)`` (one copy; channels-last stays so)."""
        fmt = layout_of(x)
        grouped = self._groups_view(x)
        if self.padded:
            return grouped[self.group_of_row, self.slot_of_row].contiguous(memory_format=fmt)
        g, m = self.groups, self.rows
        out = torch.empty((g * m, *grouped.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        out.unflatten(0, (g, m)).copy_(grouped)
        return out


@dataclass
class TaskSelection:
    """The tasks of one batch.

    ``single`` is set when every row belongs to one task.  Otherwise ``tasks`` lists the distinct
    tasks in ascending order, ``local_ids (M,)`` maps each row to its position in ``tasks``,
    ``groups`` holds ``(task, row indices)`` per distinct task and ``restore (M,)`` puts rows that
    were concatenated group by group back in batch order; ``order (M,)`` sorts the rows by task (stable).
    ``spans`` holds ``(start, length)`` per group when the rows are already grouped by ascending task
    (then no row needs to move: :meth:`rows` is a view and :meth:`regroup` a concatenation).
    """

    single: int | None = None
    tasks: list[int] = field(default_factory=list)
    local_ids: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    restore: torch.Tensor | None = None
    order: torch.Tensor | None = None
    spans: list[tuple[int, int]] | None = None
    grouped: GroupedLayout | None = None

    @property
    def equal_group_size(self) -> int | None:
        """The rows per group when the rows are sorted by task (``spans``) into groups of one size, else None."""
        if self.spans is None or len({n for _, n in self.spans}) != 1:
            return None
        return self.spans[0][1]

    def holds_grouped(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is an activation in the :class:`GroupedLayout` of this batch."""
        return self.grouped is not None and self.grouped.holds(x)

    def as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the row layout (rows sorted by task), moved out of the grouped layout if it is in it."""
        return self.grouped.ungroup(x) if self.holds_grouped(x) else x

    def check_rows(self, x: torch.Tensor, module: str) -> None:
        """A ``ValueError`` naming ``module`` when ``x`` does not hold this mixed batch's rows along its first
        dimension (e.g. a sequence-first activation, whose rows a task-aware module would mistake for samples)."""
        rows = self.local_ids.shape[0]
        if x.dim() == 0 or x.shape[0] != rows:
            raise ValueError(
                f"{module} got a mixed-task batch of {rows} rows as shape {tuple(x.shape)}: task-aware modules take a "
                f"mixed batch along the first dimension (batch first); run a sequence-first model one task at a time")

    def rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The rows of ``x`` that belong to group ``i``."""
        if self.spans is not None:
            return x.narrow(0, *self.spans[i])
        return take_rows(x, self.groups[i][1])

    def regroup(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-group results (in ``groups`` order) and restore the batch order."""
        if self.spans is not None:
            return torch.cat(parts)
        return take_rows(torch.cat(parts), self.restore)

    def sorted(self) -> TaskSelection:
        """The selection of the same batch with its rows reordered by ``order``."""
        if self.single is not None or self.spans is not None:
            return self
        counts = [len(idx) for _, idx in self.groups]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        ids = self.local_ids.index_select(0, self.order)
        groups = [(t, torch.arange(a, a + n, device=ids.device)) for (t, _), a, n in
                  zip(self.groups, starts, counts, strict=True)]
        return TaskSelection(tasks=self.tasks, local_ids=ids, groups=groups, order=None,
                             restore=torch.arange(len(ids), device=ids.device), spans=list(zip(starts, counts,
                                                                                                   strict=True)))


#: The grouped layout serves a mixed batch when its zero padding adds at most this fraction of the batch.
GROUPED_MAX_PADDING = 0.25


def grouped_selection(sel: TaskSelection) -> TaskSelection | None:
    """``sel`` (rows sorted by task: ``spans`` set) with a :class:`GroupedLayout`, or ``None`` when the groups
    differ so much in size that the zero padding would exceed :data:`GROUPED_MAX_PADDING` of the batch."""
    counts = [n for _, n in sel.spans]
    g, m, total = len(counts), max(counts), sum(counts)
    if g * m > (1 + GROUPED_MAX_PADDING) * total:
        return None
    group_of_row = slot_of_row = None
    if min(counts) != m:
        device = sel.local_ids.device
        group_of_row = torch.repeat_interleave(torch.arange(g, device=device),
                                               torch.tensor(counts, device=device))
        slot_of_row = torch.cat([torch.arange(n, device=device) for n in counts])
    layout = GroupedLayout(g, m, group_of_row, slot_of_row)
    return TaskSelection(tasks=sel.tasks, local_ids=sel.local_ids, groups=sel.groups, restore=sel.restore,
                         order=sel.order, spans=sel.spans, grouped=layout)


def select_tasks(task_ids, batch: int, num_tasks: int, device: torch.device | None = None) -> TaskSelection:
    """Validate ``task_ids`` (an int, or an int64 tensor of shape ``(batch,)``) and resolve it."""
    if isinstance(task_ids, torch.Tensor) and task_ids.dim() == 0:
        if task_ids.dtype != torch.int64:
            raise TypeError(f"task_ids must be an int or an int64 tensor, got a 0-d tensor of dtype "
                            f"{task_ids.dtype}")
        task_ids = int(task_ids)
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        if not 0 <= task_ids < num_tasks:
            raise ValueError(f"task id {task_ids} is out of range: the model has tasks 0..{num_tasks - 1} "
                             f"(add_task() adds one)")
        return TaskSelection(single=task_ids)
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be an int or an int64 tensor of shape ({batch},), "
                        f"got {type(task_ids).__name__}")
    if task_ids.dtype != torch.int64:
        raise TypeError(f"task_ids must be int64 with shape ({batch},), got dtype {task_ids.dtype}")
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(f"task_ids must have shape ({batch},) (one task per sample), got {tuple(task_ids.shape)}")
    if device is not None:
        task_ids = task_ids.to(device)
    if batch == 0:
        raise ValueError("the batch is empty, so task_ids names no task: pass an int task id for an empty batch "
                         "(its output has that task's classes)")
    tasks_t, local_ids, counts = torch.unique(task_ids, sorted=True, return_inverse=True, return_counts=True)
    tasks = tasks_t.tolist()
    if tasks[0] < 0 or tasks[-1] >= num_tasks:
        bad = tasks[0] if tasks[0] < 0 else tasks[-1]
        raise ValueError(f"task id {bad} in task_ids is out of range: the model has tasks 0..{num_tasks - 1}")
    if len(tasks) == 1:
        return TaskSelection(single=tasks[0])
    order = torch.argsort(task_ids, stable=True)
    sizes = counts.tolist()
    groups = list(zip(tasks, torch.split(order, sizes), strict=True))
    spans = None
    if bool((task_ids[1:] >= task_ids[:-1]).all()):
        spans = list(zip([sum(sizes[:i]) for i in range(len(sizes))], sizes, strict=True))
    return TaskSelection(tasks=tasks, local_ids=local_ids, groups=groups, restore=torch.argsort(order), order=order,
                         spans=spans)


class TaskContext:
    """Holds the :class:`TaskSelection` of the batch in flight."""

    def __init__(self) -> None:
        self.selection: TaskSelection | None = None
        #: while a forward of a later task or a coverage check runs: {"ran": layers whose forward ran, "read":
        #: layers whose weight or bias other code read directly}; else None
        self.watch: dict[str, set[str]] | None = None
        #: bumped whenever the library changes a module's tensors or ranks (set_rank, load_state_dict, to()): what
        #: was prepared from the old ones is stale
        self.generation = 0
        #: held by a TaskModel's forward (re-entrant): a second thread waits instead of overwriting the selection
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["lock"]  # a lock is not copied or pickled: a copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @contextmanager
    def use(self, selection: TaskSelection) -> Iterator[None]:
        previous, self.selection = self.selection, selection
        try:
            yield
        finally:
            self.selection = previous


class TaskModule(torch.nn.Module):
    """Base of the task-aware modules: resolves the selection for a forward call."""

    def __init__(self, ctx: TaskContext | None = None) -> None:
        super().__init__()
        self._ctx = ctx if ctx is not None else TaskContext()
        self.num_tasks = 1

    def _selection(self, task_ids, x: torch.Tensor) -> TaskSelection:
        if task_ids is not None:
            return select_tasks(task_ids, x.shape[0], self.num_tasks, x.device)
        if self._ctx.selection is None:
            raise ValueError(
                f"{type(self).__name__} needs task ids: call it as module(x, task_ids) or through the TaskModel "
                f"that holds it (model(x, task_ids))"
            )
        return self._ctx.selection

    # ------------------------------------------------------------ stand-ins (see stand_ins.py)
    #: whether :meth:`stand_in` may give a module to run in this one's place in a single-task forward without
    #: autograd; ``stands_in_per_call``: also outside a serving session (where it is prepared for every call)
    has_stand_in = False
    stands_in_per_call = False

    def stand_in(self, t: int, constant: bool):
        """A :class:`~halrp_fast.nn.stand_ins.StandIn` computing this module's forward for task ``t`` (an id already
        checked) from the same arguments without autograd, or ``None`` (the module runs itself).  ``constant``: for
        reuse while the parameters do not change (a serving session); its ``sources`` then list the tensors it was
        derived from."""
        return None

    def remove_last_task(self) -> None:
        """Undo this module's last ``add_task`` (the newest task, never task 0): what it added is gone and the
        module's state dict is what it was before.  Every task-aware module type undoes its own ``add_task``."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to remove a task")

    def _check_removable(self) -> int:
        """The id of the newest task, which :meth:`remove_last_task` removes (never the base)."""
        if self.num_tasks < 2:
            raise ValueError(f"{type(self).__name__} holds only the base (task 0), which cannot be removed")
        return self.num_tasks - 1

    def clear_caches(self) -> None:
        """Forget what was derived from the parameters (merged weights, prepared tensors; none here)."""

    def stand_in_tree(self) -> torch.nn.Module | None:
        """A module tree that the stand-in runs and in which other task-aware modules may sit (``None``: none)."""
        return None

    #: the module's qualified name in its TaskModel (for errors), set by the model
    module_name = ""

    def describe(self, kind: str) -> str:
        """``'<qualified name>' (<kind>)`` for an error, or the kind alone outside a TaskModel."""
        return f"{self.module_name!r} ({kind})" if self.module_name else kind

    #: state-dict key prefixes (relative to the module) of per-task containers: "<prefix>.<task>.<...>"
    _task_containers: tuple[str, ...] = ()

    def task_of_key(self, key: str) -> int:
        """The task that owns the state-dict entry ``key`` (relative to this module); 0 = the base."""
        head, _, rest = key.partition(".")
        if head in self._task_containers:
            return int(rest.split(".", 1)[0])
        return 0

    def task_tensors_by_key(self, t: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s (``t ≥ 1``) parameters and buffers, keyed as in this module's state dict.

        Reads only task ``t``'s entry of each per-task container, so the cost does not grow with the
        number of tasks.
        """
        out: dict[str, torch.Tensor] = {}
        key = str(t)
        for name in self._task_containers:
            container = getattr(self, name)
            tensor = container._parameters.get(key, container._buffers.get(key))
            if tensor is not None:
                out[f"{name}.{key}"] = tensor
            elif key in container._modules:
                for k, v in container._modules[key].state_dict(keep_vars=True).items():
                    out[f"{name}.{key}.{k}"] = v
        return out

    def _check_task(self, t: int, allow_base: bool = True) -> int:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"task must be an int, got {type(t).__name__}")
        lo = 0 if allow_base else 1
        if not lo <= t < self.num_tasks:
            raise ValueError(f"task {t} is out of range: expected {lo}..{self.num_tasks - 1}")
        return t
