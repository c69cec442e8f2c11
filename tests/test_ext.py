"""The compiled extension halrp_fast._C: its C++ CPU kernels (provider "cpp") against the float64 oracle,
opcheck, the routing by HALRP_FAST_BACKEND, and the validation that guards them.  Skipped when the extension is
not built (the rest of the suite then runs on the Python providers)."""
import pytest
import torch
from oracle import assert_close, assert_low_precision, conv_mt, linear_mt
from torch.library import opcheck

import halrp_fast as hf
from halrp_fast import _backend, _ext, reference

if _ext.load() is not None:
    pytest.skip(f"halrp_fast._C is not available: {_ext.load()}", allow_module_level=True)

LINEAR = torch.ops.halrp.perturbed_linear_mt.default
CONV = torch.ops.halrp.perturbed_conv2d_mt.default
SCALINGS = torch.ops.halrp.fit_scalings.default


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    """Route CPU calls to the compiled kernels (the auto default when the extension is loaded)."""
    monkeypatch.setenv("HALRP_FAST_BACKEND", "cpp")


def banks(T, n_in, n_out, k, dtype=torch.float32, bias=True):
    g = dict(dtype=dtype)
    return (1 + 0.3 * torch.randn(T, n_out, **g), 1 + 0.3 * torch.randn(T, n_in, **g),
            0.3 * torch.randn(T, n_out, k, **g), 0.3 * torch.randn(T, n_in, k, **g),
            torch.randn(T, n_out, **g) if bias else None)


def poison_allocator():
    """Free a NaN-filled block so fresh outputs that are not fully written show NaN."""
    block = torch.full((1 << 20,), float("nan"))
    del block


def test_extension_serves_cpu_ops():
    for op in ("perturbed_linear_mt", "perturbed_conv2d_mt", "fit_scalings"):
        assert _ext.has_kernel(op, "cpu")
        assert _backend.select(op, "cpu")[0] == "cpp"
    assert "cpp        devices=cpu        available" in _backend.env_report(("cpu",))


IDS = {"unsorted": [3, 0, 2, 0, 1, 3, 3], "sorted": [0, 0, 1, 3, 3], "single": [2] * 6, "one_row": [1],
       "empty": [], "many": list(range(5)) * 13}


@pytest.mark.parametrize("case", list(IDS))
@pytest.mark.parametrize("k", [0, 1, 3, 17, 70])
@pytest.mark.parametrize("save", [False, True])
def test_linear_mt_matches_oracle(case, k, save):
    ids = torch.tensor(IDS[case], dtype=torch.int64)
    x = torch.randn(len(ids), 13, dtype=torch.float64)
    W = torch.randn(11, 13, dtype=torch.float64) / 13**0.5
    bk = banks(5, 13, 11, k, torch.float64)
    poison_allocator()
    y, c, xv = LINEAR(x, ids, W, *bk, save)
    assert_close(y, linear_mt(x, ids, W, *bk), torch.float64)
    if save:  # the saved tensors are the reference's, row for row
        _, c_ref, xv_ref = reference.perturbed_linear_mt(x, ids, W, *bk, True)
        assert_close(c, c_ref, torch.float64)
        assert_close(xv, xv_ref, torch.float64)
    else:
        assert c.numel() == 0 and xv.numel() == 0


@pytest.mark.parametrize("order", ["sorted", "interleaved"])
@pytest.mark.parametrize("large_tasks", [1, 3])
@pytest.mark.parametrize("save", [False, True])
def test_linear_mt_large_task_blocks(order, large_tasks, save):
    """Tasks with many rows take the two-GEMM low-rank path (their rows gathered unless the ids are sorted), tasks
    with few rows the row-wise path, in one batch."""
    counts = [40] * large_tasks + [3, 1]
    ids = torch.cat([torch.full((n,), t) for t, n in enumerate(counts)])
    if order == "interleaved":
        ids = ids[torch.randperm(len(ids))]
    x = torch.randn(len(ids), 64, dtype=torch.float64)
    W = torch.randn(48, 64, dtype=torch.float64) / 8
    bk = banks(len(counts), 64, 48, 17, torch.float64)
    poison_allocator()
    y, c, xv = LINEAR(x, ids, W, *bk, save)
    assert_close(y, linear_mt(x, ids, W, *bk), torch.float64)
    if save:
        _, c_ref, xv_ref = reference.perturbed_linear_mt(x, ids, W, *bk, True)
        assert_close(c, c_ref, torch.float64)
        assert_close(xv, xv_ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_mt_rows_of_several_and_strided_inputs(dtype):
    ids = torch.tensor([2, 0, 2, 1, 0])
    x = torch.randn(5, 3, 31, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)  # (M, L, in), strided
    assert not x.is_contiguous()
    W = torch.randn(29, 40, dtype=dtype)[:, :31]  # non-contiguous weight
    R, S, U, V, B = banks(3, 31, 29, 4, dtype)
    y, _, _ = LINEAR(x, ids, W, R, S, U.transpose(1, 2).contiguous().transpose(1, 2), V, B, False)
    expected = linear_mt(x.reshape(5, -1, 31)[:, 0], ids, W, R, S, U, V, B)
    assert_close(y[:, 0], expected, dtype)
    for l in range(3):
        assert_close(y[:, l], linear_mt(x[:, l], ids, W, R, S, U, V, B), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_mt_low_precision(dtype):
    ids = torch.tensor([1, 0, 1, 2, 2, 0, 1])
    x = torch.randn(7, 64)
    W = torch.randn(48, 64) / 8
    bk = banks(3, 64, 48, 8)
    expected = linear_mt(x, ids, W, *bk)
    low = [t.to(dtype) if t is not None else None for t in (x, W, *bk)]
    y, _, _ = LINEAR(low[0], ids, low[1], *low[2:], False)
    assert y.dtype == dtype
    baseline = reference.perturbed_linear_mt(low[0], ids, low[1], *low[2:], False)[0]
    assert_low_precision(y, baseline, expected)


GEOMETRIES = [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 1), (1, 1)), ((1, 2), (1, 0), (2, 1)), ((2, 2), (2, 2), (1, 1))]


@pytest.mark.parametrize("case", ["unsorted", "sorted", "single", "one_row", "empty"])
@pytest.mark.parametrize("k", [0, 2, 9, 70])  # k ≥ C_in: the window sum runs before the channel mix
@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])  # channels-last inference: the NHWC kernel
def test_conv_mt_matches_oracle(case, k, geo, save, layout):
    ids = torch.tensor(IDS[case], dtype=torch.int64)
    x = torch.randn(len(ids), 5, 9, 8, dtype=torch.float64)
    W = torch.randn(7, 5, 3, 3, dtype=torch.float64) / 6
    if layout == "channels_last":
        x, W = x.to(memory_format=torch.channels_last), W.to(memory_format=torch.channels_last)
    bk = banks(4, 5, 7, k, torch.float64)
    poison_allocator()
    y, c, pooled = CONV(x, ids, W, *bk, save, *geo)
    assert_close(y, conv_mt(x, ids, W, *bk, *geo), torch.float64)
    if layout == "channels_last" and len(ids):
        assert y.is_contiguous(memory_format=torch.channels_last)
    if save:
        _, c_ref, p_ref = reference.perturbed_conv2d_mt(x, ids, W, *bk, True, *geo)
        assert_close(c, c_ref, torch.float64)
        assert_close(pooled, p_ref, torch.float64)


def test_conv_mt_channels_last_and_no_bias():
    ids = torch.tensor([1, 1, 0])
    x = torch.randn(3, 6, 10, 10).to(memory_format=torch.channels_last)
    W = torch.randn(8, 6, 5, 5) / 10
    R, S, U, V, _ = banks(2, 6, 8, 3, bias=False)
    y, _, _ = CONV(x, ids, W, R, S, U, V, None, False, [1, 1], [2, 2], [1, 1])
    assert_close(y, conv_mt(x, ids, W, R, S, U, V, None, 1, 2, 1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_mt_low_precision(dtype, layout):
    ids = torch.tensor([2, 0, 0, 1, 2, 2])
    x = torch.randn(6, 12, 9, 9).to(memory_format=layout)
    W = (torch.randn(10, 12, 3, 3) / 10).to(memory_format=layout)
    bk = banks(3, 12, 10, 5)
    expected = conv_mt(x, ids, W, *bk, 1, 1, 1)
    low = [t.to(dtype) for t in (x, W, *bk)]
    y, _, _ = CONV(low[0], ids, low[1], *low[2:], False, [1, 1], [1, 1], [1, 1])
    assert y.dtype == dtype
    baseline = reference.perturbed_conv2d_mt(low[0], ids, low[1], *low[2:], False, [1, 1], [1, 1], [1, 1])[0]
    assert_low_precision(y, baseline, expected)


def test_conv_mt_channels_last_runs_of_tasks_and_large_batch():
    """Channels-last inference over many images in task runs (the rows a TaskModel sorts), C_in > k and C_in ≤ k."""
    for c_in, k in ((20, 6), (3, 16)):
        ids = torch.tensor([4] * 9 + [1] * 17 + [0] * 3 + [4] * 11)
        x = torch.randn(len(ids), c_in, 12, 11).to(memory_format=torch.channels_last)
        W = (torch.randn(13, c_in, 5, 5) / (5 * c_in**0.5)).to(memory_format=torch.channels_last)
        bk = banks(5, c_in, 13, k)
        y, _, _ = CONV(x, ids, W, *bk, False, [1, 1], [2, 2], [1, 1])
        assert_close(y, conv_mt(x, ids, W, *bk, 1, 2, 1), torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (300, 7), (16, 8, 3, 3), (5, 3, 1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_scalings_matches_reference(shape, dtype):
    W = torch.randn(*shape, dtype=torch.float64)
    W[0] = 0  # an all-zero row: r = 0 there, no division by zero
    Wf = W * (1 + 0.1 * torch.randn(*shape, dtype=torch.float64))
    r, s = SCALINGS(Wf.to(dtype), W.to(dtype))
    r_ref, s_ref = reference.fit_scalings(Wf, W)
    assert r.dtype == s.dtype == dtype
    assert_close(r, r_ref, dtype)
    assert_close(s, s_ref, dtype)


def test_fit_scalings_recovers_row_scalings():
    W = torch.randn(40, 30, dtype=torch.float64)
    r_true = 1 + torch.rand(40, dtype=torch.float64)
    r, s = SCALINGS(r_true[:, None] * W, W)  # the row fit is exact, and then s = 1
    torch.testing.assert_close(r, r_true)
    torch.testing.assert_close(s, torch.ones(30, dtype=torch.float64))


@pytest.mark.parametrize("save", [False, True])
def test_opcheck(save):
    ids = torch.tensor([1, 0, 1])
    opcheck(LINEAR, (torch.randn(3, 2, 6), ids, torch.randn(5, 6), *banks(2, 6, 5, 3), save))
    geo = ([1, 2], [1, 1], [1, 1])
    opcheck(CONV, (torch.randn(3, 4, 6, 7), ids, torch.randn(5, 4, 3, 3), *banks(2, 4, 5, 2), save, *geo))
    opcheck(SCALINGS, (torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)))


def test_routing_follows_the_environment(monkeypatch):
    """The compiled kernel runs only when HALRP_FAST_BACKEND allows it; otherwise the call reaches the chosen
    Python provider, through torch.ops as well as the public functions."""
    ref = _backend._PROVIDERS["reference"]
    calls = []
    original = ref.impls()["perturbed_linear_mt"]
    monkeypatch.setitem(ref._impls, "perturbed_linear_mt", lambda *a: calls.append(1) or original(*a))
    ids = torch.tensor([0, 1])
    args = (torch.randn(2, 4), ids, torch.randn(3, 4), *banks(2, 4, 3, 2), False)
    LINEAR(*args)
    assert calls == []
    monkeypatch.setenv("HALRP_FAST_BACKEND", "reference")
    LINEAR(*args)
    assert calls == [1]
    monkeypatch.setenv("HALRP_FAST_BACKEND", "auto")
    LINEAR(*args)
    assert calls == [1]


def test_bad_input_bound_for_the_compiled_kernels_is_refused_before_they_run(monkeypatch):
    """The compiled kernels trust their arguments: the op's one validation refuses bad ones first, through
    torch.ops as well as the public functions, and the kernel is never reached."""
    cpp = _backend._PROVIDERS["cpp"]
    cpp.impls()
    calls = []
    for op in ("perturbed_linear_mt", "perturbed_conv2d_mt", "fit_scalings"):
        monkeypatch.setitem(cpp._impls, op, lambda *a, _op=op: calls.append(_op) or getattr(reference, _op)(*a))
    _backend._SELECTION.clear()
    ids = torch.tensor([0, 2])
    x, W = torch.randn(2, 4), torch.randn(3, 4)
    bk = banks(2, 4, 3, 2)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\).*found 2"):
        LINEAR(x, ids, W, *bk, False)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\).*found 2"):
        hf.perturbed_linear_mt(x, ids, W, *bk)
    with pytest.raises(TypeError, match="task_ids must be int64"):
        LINEAR(x, ids.int(), W, *bk, False)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        LINEAR(x, torch.tensor([0, 1]), W.double(), *bk, False)
    with pytest.raises(ValueError, match=r"V must have shape \(2, 4, 2\)"):
        LINEAR(x, torch.tensor([0, 1]), W, *bk[:3], bk[3][:, :3], bk[4], False)
    with pytest.raises(ValueError, match="W_free must have the shape of W"):
        SCALINGS(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="too small for kernel"):
        CONV(torch.randn(1, 4, 2, 2), torch.tensor([0]), torch.randn(3, 4, 3, 3), *banks(1, 4, 3, 1), False,
             [1, 1], [0, 0], [1, 1])
    assert calls == []
    LINEAR(x, torch.tensor([0, 1]), W, *bk, False)
    assert calls == ["perturbed_linear_mt"]
