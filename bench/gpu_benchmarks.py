"""The benchmark stages of ``bench/gpu_check.py``: linear, mixed-task, conv and rsvd against the dense floor, the
eager formula and ``torch.compile``, each beside its roofline bound and the target it serves, and the 3-task
end-to-end run per phase.  Each stage is ``stage_x(ctx, records)``: ``ctx`` the check's device, dtype and dry-run
flag, ``records`` the list its rows are appended to; imports of torch and the package happen inside (the check
installs the package before anything imports it).
"""
from __future__ import annotations

import time


def _served(op: str, ctx) -> str:
    from halrp_fast import _backend

    return _backend.select(op, ctx.device, ctx.dtype)[0]


def _roofline_device(ctx):
    import roofline

    return roofline.DEVICES["H200" if "H200" in ctx.device_name else "H100-SXM"]


def stage_linear(ctx, records) -> None:
    import bench_perturbed_linear as bl
    import roofline
    import torch
    import torch.nn.functional as F
    from _common import median_ms

    import halrp_fast as hf

    dev, dtype = ctx.device, ctx.dtype
    dname = hf._backend.dtype_name(dtype)
    rdev = _roofline_device(ctx)
    NK = 64 if ctx.dry_run else 4096
    compiled = torch.compile(bl.eager)
    compile_error = None
    for M in ((1, 16, 40) if ctx.dry_run else (1, 16, 2048, 8192)):
        for k in (8, 64):
            x, W, r, s, U, V, b = bl._tensors(M, NK, NK, k, dtype, dev)
            with torch.no_grad():
                t_dense = median_ms(lambda: F.linear(x, W, b), dev)
                t_eager = median_ms(lambda: bl.eager(x, W, r, s, U, V, b), dev)
                try:  # a baseline: its failure (say, an older inductor on the machine) costs only its column
                    t_comp = median_ms(lambda: compiled(x, W, r, s, U, V, b), dev)
                except Exception as err:  # noqa: BLE001
                    t_comp, compile_error = float("nan"), f"{type(err).__name__}: {err}"[:200]
                t_ours = median_ms(lambda: hf.perturbed_linear(x, W, r, s, U, V, b), dev)
            cost = roofline.perturbed_linear(M, NK, NK, k, dname)
            if M <= 16:
                target, met = "≤ 1.05× dense", t_ours <= 1.05 * t_dense
            else:
                target, met = "≥ 0.9× dense TFLOP/s", t_ours <= t_dense / 0.9
            records.append({"kind": "fwd", "provider": _served("perturbed_linear", ctx), "M": M, "N=K": NK, "rank": k,
                            "dense ms": t_dense, "eager ms": t_eager,
                            "compiled ms": t_comp, "ours ms": t_ours, "ours/dense": t_ours / t_dense,
                            "bound ms": roofline.bound_ms(cost, rdev, dname),
                            "ours TFLOP/s": cost.flops / t_ours / 1e9, "target": target, "met": met,
                            **({"compile error": compile_error} if compile_error else {})})
    for M in ((40,) if ctx.dry_run else (2048, 8192)):
        x, W, r, s, U, V, b = bl._tensors(M, NK, NK, 8, dtype, dev)
        params = [p.requires_grad_() for p in (x, r, s, U, V, b)]
        gy = torch.randn(M, NK, dtype=dtype, device=dev)

        def step(fn):
            return torch.autograd.grad(fn(x, W, r, s, U, V, b), params, gy)

        xd = x.detach().requires_grad_()
        t_dense = median_ms(lambda: torch.autograd.grad(F.linear(xd, W, b.detach()), [xd], gy), dev)
        t_eager = median_ms(lambda: step(bl.eager), dev)
        t_ours = median_ms(lambda: step(hf.perturbed_linear), dev)
        cost = roofline.perturbed_linear_fwd_bwd(M, NK, NK, 8, dname)
        records.append({"kind": "fwd+bwd", "provider": _served("perturbed_linear", ctx), "M": M, "N=K": NK, "rank": 8,
                        "dense ms": t_dense, "eager ms": t_eager,
                        "ours ms": t_ours, "ours/dense": t_ours / t_dense,
                        "bound ms": roofline.bound_ms(cost, rdev, dname), "target": "≥ 1.2× eager",
                        "met": t_eager / t_ours >= 1.2})


def stage_mixed(ctx, records) -> None:
    import bench_perturbed_linear as bl
    import roofline
    import torch
    import torch.nn.functional as F
    from _common import median_ms

    import halrp_fast as hf

    dev, dtype = ctx.device, ctx.dtype
    dname = hf._backend.dtype_name(dtype)
    NK = 64 if ctx.dry_run else 4096
    for M in ((32,) if ctx.dry_run else (128, 2048)):
        for T in (8,) if ctx.dry_run else (8, 32):
            x, W, R, S, U, V, B = bl._tensors(M, NK, NK, 8, dtype, dev, T=T)
            ids = (torch.arange(M, device=dev) % T)[torch.randperm(M, device=dev)]
            groups = [(t, (ids == t).nonzero().flatten()) for t in range(T)]
            with torch.no_grad():
                t_dense = median_ms(lambda: F.linear(x, W), dev)
                t_loop = median_ms(lambda: bl.eager_loop_mt(x, ids, W, R, S, U, V, B, groups), dev)
                t_ours = median_ms(lambda: hf.perturbed_linear_mt(x, ids, W, R, S, U, V, B), dev)
            cost = roofline.perturbed_linear(M, NK, NK, 8, dname, T)
            records.append({"provider": _served("perturbed_linear_mt", ctx), "M": M, "N=K": NK, "rank": 8, "tasks": T,
                            "dense ms": t_dense, "loop ms": t_loop,
                            "ours ms": t_ours, "loop/ours": t_loop / t_ours,
                            "bound ms": roofline.bound_ms(cost, _roofline_device(ctx), dname),
                            "target": "≥ 3× loop" if T == 8 else "", "met": t_loop / t_ours >= 3 if T == 8 else None})


def stage_conv(ctx, records) -> None:
    import bench_perturbed_conv as bc
    import roofline
    import torch
    import torch.nn.functional as F
    from _common import median_ms

    import halrp_fast as hf

    dev, dtype = ctx.device, ctx.dtype
    dname = hf._backend.dtype_name(dtype)
    for name, c_in, c_out, hw, kern, pad in bc.LAYERS:
        batch = 2 if ctx.dry_run else 256
        x, W, r, s, U, V, b = bc._tensors(batch, c_in, c_out, hw, kern, 8, dtype, dev)
        with torch.no_grad():
            t_dense = median_ms(lambda: F.conv2d(x, W, b, 1, pad), dev)
            t_eager = median_ms(lambda: bc.eager(x, W, r, s, U, V, b, pad), dev)
            t_ours = median_ms(lambda: hf.perturbed_conv2d(x, W, r, s, U, V, b, 1, pad), dev)
        cost = roofline.perturbed_conv(batch, c_in, c_out, hw, kern, pad, 8, dname)
        records.append({"provider": _served("perturbed_conv2d", ctx), "layer": name, "batch": batch, "rank": 8,
                        "dense ms": t_dense, "eager ms": t_eager,
                        "ours ms": t_ours, "ours/dense": t_ours / t_dense, "eager/ours": t_eager / t_ours,
                        "bound ms": roofline.bound_ms(cost, _roofline_device(ctx), dname)})


def stage_rsvd(ctx, records) -> None:
    import bench_rsvd as br
    import roofline
    import torch
    from _common import median_ms

    from halrp_fast.linalg import rsvd

    dev = ctx.device
    for B, side, k in ((2, 32, 4),) if ctx.dry_run else ((16, 1024, 64), (64, 256, 16)):
        A = br.decaying_batch(B, side, side, dev)
        exact = torch.linalg.svdvals(A)
        t_loop = median_ms(lambda: [torch.linalg.svd(a, full_matrices=False) for a in A], dev, 0.2)
        t_low = median_ms(lambda: torch.svd_lowrank(A, q=k + 10, niter=2), dev, 0.2)
        t_ours = median_ms(lambda: rsvd(A, k, power_iters=2), dev, 0.2)
        err_low = float(br._max_rel_err(torch.svd_lowrank(A, q=k + 10, niter=2)[1][:, :k], exact[:, :k]))
        err_ours = float(br._max_rel_err(rsvd(A, k)[1], exact[:, :k]))
        records.append({"batch": B, "side": side, "rank": k, "looped svd ms": t_loop, "svd_lowrank ms": t_low,
                        "ours ms": t_ours, "loop/ours": t_loop / t_ours, "lowrank/ours": t_low / t_ours,
                        "err lowrank": err_low, "err ours": err_ours,
                        "bound ms": roofline.bound_ms(roofline.rsvd(B, side, side, k), _roofline_device(ctx),
                                                      "float32"),
                        "target": "≥ 10× loop, ≥ 3× svd_lowrank",
                        "met": t_loop / t_ours >= 10 and t_low / t_ours >= 3 and err_ours <= 2 * err_low + 1e-6})


def stage_end_to_end(ctx, records, compile_mode: str = "off") -> None:
    import torch

    from halrp_fast import models
    from halrp_fast.continual import HALRPConfig, HALRPLearner
    from halrp_fast.data.digits import permuted_digits

    torch.manual_seed(0)
    tasks = permuted_digits(num_tasks=3, batch_size=64, seed=0, max_per_task=64 if ctx.dry_run else None)
    cfg = HALRPConfig(epochs=2, est_rank_epochs=1, device=ctx.device, seed=0, compile=compile_mode)
    learner = HALRPLearner(models.lenet(1, 8, 10), cfg)
    for t, d in enumerate(tasks):
        tic = time.perf_counter()
        report = learner.learn_task(d.train, d.val, d.num_classes)
        wall = time.perf_counter() - tic
        acc = learner.evaluate(d.test, t)
        records.append({"compile": compile_mode, "task": t, "wall s": wall,
                        **{f"{p} s": v for p, v in report.seconds.items()},
                        "test acc %": acc})
