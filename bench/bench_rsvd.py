"""Randomized SVD and the whole rank-estimation step.

Table 1 — batches of matrices with decaying spectra: a Python loop of ``torch.linalg.svd``,
``torch.svd_lowrank`` (batched) and ``halrp_fast.linalg.rsvd`` (batched), with the largest relative error of
the top-k singular values against the exact ones.

Table 2 — the estimation step for the paper's networks (scalings, discrepancies, spectra, global allocation,
initial U, V; the importance is given, identical for both): ours (vectorised scalings, adaptive randomized
SVD) against a straightforward implementation (Python loops over rows and columns for the scalings, a full
SVD per layer, numpy sorting).  ``W_free`` is synthetic: the base scaled per row and column plus a rank-32
perturbation with decaying singular values and 1e-3 noise — the structure the estimation step exists for.

    python bench/bench_rsvd.py [--full]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import environment_line, markdown_table, median_ms, parse_args

import halrp_fast as hf
from halrp_fast.continual.allocation import allocate_adaptive, lowrank_init
from halrp_fast.continual.estimation import kernel_areas
from halrp_fast.linalg import discrepancy, fit_scalings, rsvd


def decaying_batch(B, m, n, device, decay=0.9):
    U, _ = torch.linalg.qr(torch.randn(B, m, min(m, n), device=device))
    V, _ = torch.linalg.qr(torch.randn(B, n, min(m, n), device=device))
    S = decay ** torch.arange(min(m, n), device=device, dtype=torch.float32)
    return U @ torch.diag_embed(S.expand(B, -1)) @ V.mT


def _max_rel_err(approx, exact):
    return (approx - exact).abs().div(exact).max()


def table_rsvd(device, full):
    rows = []
    batches, sides, ks = ((16, 64), (256, 1024, 4096), (16, 64)) if full else ((16,), (256, 512), (16, 64))
    for B in batches:
        for side in sides:
            A = decaying_batch(B, side, side, device)
            exact = torch.linalg.svdvals(A)
            for k in ks:
                t_loop = median_ms(lambda: [torch.linalg.svd(a, full_matrices=False) for a in A], device, 0.2)
                t_low = median_ms(lambda: torch.svd_lowrank(A, q=k + 10, niter=2), device, 0.2)
                t_ours = median_ms(lambda: rsvd(A, k, power_iters=2), device, 0.2)
                err_low = _max_rel_err(torch.svd_lowrank(A, q=k + 10, niter=2)[1][:, :k], exact[:, :k])
                err_ours = _max_rel_err(rsvd(A, k)[1], exact[:, :k])
                rows.append([B, side, k, t_loop, t_low, t_ours, t_loop / t_ours, t_low / t_ours,
                             f"{float(err_low):.1e}", f"{float(err_ours):.1e}"])
    return rows


def synthetic_free(model: hf.TaskModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, L in model.perturbed_layers().items():
        W = L.weight.detach()
        o, i = W.shape[:2]
        r = 1 + 0.1 * torch.randn(o, generator=g)
        s = 1 + 0.1 * torch.randn(i, generator=g)
        k = min(32, o, i)
        lr = (torch.randn(o, k, generator=g) * 0.8 ** torch.arange(k)) @ torch.randn(k, i, generator=g) * 0.01
        shape = (o, i) + (1,) * (W.dim() - 2)
        scaled = r.view(-1, *[1] * (W.dim() - 1)) * W * s.view(1, -1, *[1] * (W.dim() - 2))
        out[name] = scaled + lr.view(shape) + 1e-3 * torch.randn(W.shape, generator=g)
    return out


def estimation_ours(model, frees, importance, rate=0.9, upper=100):
    mats, scal = {}, {}
    for n, L in model.perturbed_layers().items():
        r, s = fit_scalings(frees[n], L.weight.detach())
        scal[n] = (r, s)
        mats[n] = discrepancy(frees[n], L.weight.detach(), r, s)
    spectra, alloc = allocate_adaptive(mats, importance, kernel_areas(model), rate, upper,
                                       generator=torch.Generator().manual_seed(0))
    return {n: lowrank_init(spectra[n], alloc.ranks[n]) for n in mats}, alloc.ranks


def estimation_straightforward(model, frees, importance, rate=0.9, upper=100):
    spectra, svds = {}, {}
    for n, L in model.perturbed_layers().items():
        W, Wf = L.weight.detach(), frees[n]
        o, i = W.shape[:2]
        r = torch.zeros(o)
        for j in range(o):
            r[j] = (Wf[j] * W[j]).sum() / (W[j] ** 2).sum().clamp(min=1e-20)
        s = torch.zeros(i)
        for c in range(i):
            rw = r.view(-1, *[1] * (W.dim() - 2)) * W[:, c]
            s[c] = (rw * Wf[:, c]).sum() / (rw ** 2).sum().clamp(min=1e-20)
        D = Wf - r.view(-1, *[1] * (W.dim() - 1)) * W * s.view(1, -1, *[1] * (W.dim() - 2))
        if D.dim() == 4:
            D = D.mean((2, 3))
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        svds[n] = (U, S, Vh)
        area = W.shape[2] * W.shape[3] if W.dim() == 4 else 1
        spectra[n] = (S.numpy() ** 2) * area * importance[n]
    names = list(spectra)
    scores = np.concatenate([spectra[n] for n in names])
    owner = np.concatenate([np.full(len(spectra[n]), i) for i, n in enumerate(names)])
    order = np.argsort(-scores, kind="stable")
    share = np.cumsum(scores[order]) / scores.sum()
    keep = int(np.argmax(share > rate)) + 1
    counts = np.bincount(owner[order[:keep]], minlength=len(names))
    ranks = {n: int(min(max(counts[i], 1), upper)) for i, n in enumerate(names)}
    inits = {}
    for n in names:
        U, S, Vh = svds[n]
        k = ranks[n]
        inits[n] = (U[:, :k] * S[:k].sqrt(), Vh[:k].T * S[:k].sqrt())
    return inits, ranks


def table_estimation():
    rows = []
    for name, net in (("lenet", hf.models.lenet(3, 32, 10)), ("alexnet", hf.models.alexnet(3, 32, 10)),
                      ("resnet18", hf.models.resnet18(3, 32, 10))):
        model = hf.convert(net)
        frees = synthetic_free(model)
        importance = {n: 1.0 + 0.1 * i for i, n in enumerate(model.perturbed_layers())}
        with torch.no_grad():
            t_ours = median_ms(lambda: estimation_ours(model, frees, importance), "cpu", 1.0)
            tic = time.perf_counter()
            _, ranks_straight = estimation_straightforward(model, frees, importance)
            t_straight = (time.perf_counter() - tic) * 1e3
            _, ranks_ours = estimation_ours(model, frees, importance)
        rows.append([name, len(ranks_ours), t_straight, t_ours, t_straight / t_ours, ranks_ours == ranks_straight])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true")
    args = parse_args(parser)
    torch.manual_seed(0)
    print(environment_line(args.device))
    print(markdown_table(["batch", "m = n", "k", "loop svd ms", "svd_lowrank ms", "ours ms", "loop/ours",
                          "svd_lowrank/ours", "svd_lowrank max rel err", "ours max rel err"],
                         table_rsvd(args.device, args.full)))
    print()
    print(environment_line("cpu") + " (estimation step)")
    print(markdown_table(["network", "layers", "straightforward ms", "ours ms", "speed-up", "same ranks"],
                         table_estimation()))


if __name__ == "__main__":
    main()
