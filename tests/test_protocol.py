"""The learner runs the authors' protocol, step for step.

A plain-PyTorch restatement of the authors' HALRP agent (lijiaqi/HALRP ``agents/HALRP.py``, restated from its
description: ``learn_batch``, ``estimate_ranks``, ``calculate_importance``, ``criterion``, ``init_optimizer``,
``update_model``, ``l1_pruning``, ``count_parameter``, ``validation``) and ``HALRPLearner`` learn the same stream
from the same initial weights in float64; ranks, every task's weights, BatchNorm, head, accuracies and growth must
agree.  The restatement keeps the authors' own formulation where it differs in form: gradients multiplied by 10
before Adam (eps 1e-8), the conv perturbation as 1×1 conv, ×k² average pooling and 1×1 conv, numpy's percentile,
pruned entries kept as zeros.  Provider: whatever serves the CPU ops (reference or compiled).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from halrp_fast.continual import HALRPConfig, HALRPLearner

E, ER, LR, WD, L1, RATE, UPPER, PRUNE = 3, 1, 2e-3, 1e-3, 1e-4, 0.9, 5, (1e-5, 0.40)
BATCH, N_TASKS, VALID = 16, 10, 0.2
GAMMA = 0.95 ** (BATCH / (50000 / N_TASKS * (1 - VALID)))


class Net(nn.Module):
    """A conv and two linear layers with BatchNorm, the head named ``last`` (the authors' layout)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
            nn.Linear(6 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        )
        self.last = nn.Linear(12, classes)

    def forward(self, x):
        return self.last(self.features(x))


LAYERS = [0, 5, 8]  # conv/linear indices in ``features``
BNS = [1, 6, 9]


def stream(tasks: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tasks):
        proj = torch.randn(3 * 8 * 8, 4, generator=g, dtype=torch.float64)

        def batches(n, proj=proj):
            x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
            y = (x.flatten(1) @ proj).argmax(1)
            return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, n, BATCH)]

        out.append((batches(96), batches(32), batches(48)))
    return out


# --------------------------------------------------------------------------- the authors' agent, restated
class PerturbedConv(nn.Module):
    def __init__(self, W, bias, r, s, Vt, U, padding):
        super().__init__()
        self.W, self.bias, self.r, self.s, self.Vt, self.U, self.padding = W, bias, r, s, Vt, U, padding

    def forward(self, x):
        k = self.W.shape[-1]
        main = F.conv2d(x * self.s.view(1, -1, 1, 1), self.W, padding=self.padding) * self.r.view(1, -1, 1, 1)
        low = F.conv2d(x, self.Vt.view(*self.Vt.shape, 1, 1))
        low = F.avg_pool2d(low, k, stride=1, padding=self.padding) * k * k
        return main + self.bias.view(1, -1, 1, 1) + F.conv2d(low, self.U.view(*self.U.shape, 1, 1))


class PerturbedLinear(nn.Module):
    def __init__(self, W, bias, r, s, Vt, U):
        super().__init__()
        self.W, self.bias, self.r, self.s, self.Vt, self.U = W, bias, r, s, Vt, U

    def forward(self, x):
        return F.linear(x * self.s, self.W) * self.r + self.bias + F.linear(F.linear(x, self.Vt), self.U)


def adam_steps(params, loader, epochs, loss_fn, model):
    """init_optimizer + update_model: Adam (eps 1e-8) on gradients ×10, ExponentialLR stepped per iteration."""
    opt = torch.optim.Adam(params, lr=LR, eps=1e-8)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=GAMMA)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            for p in params:
                p.grad *= 10.0
            opt.step()
            sched.step()


class AuthorsAgent:
    def __init__(self, base: Net, scalings: str):
        self.base, self.scalings = base, scalings
        self.tasks = []  # per task: dict of r, s, Vt, U, bias per layer; bn modules; head
        self.base_size = sum(p.numel() for p in base.parameters())

    def learn_base(self, loader):
        def loss(out, y):
            return F.cross_entropy(out, y) + WD * sum((self.base.features[i].weight ** 2).sum() / 2 for i in LAYERS)

        adam_steps(list(self.base.parameters()), loader, E, loss, self.base)
        for p in self.base.parameters():
            p.requires_grad = False

    def learn_task(self, head: nn.Linear, train, val):
        free = copy.deepcopy(self.base)
        free.last = head
        for p in free.parameters():
            p.requires_grad = True
        adam_steps(list(free.parameters()), train, ER, lambda out, y: F.cross_entropy(out, y), free)
        # importance on the validation loader, eval mode, true labels
        imp = {i: 0.0 for i in LAYERS}
        free.eval()
        for x, y in val:
            free.zero_grad()
            F.cross_entropy(free(x), y).backward()
            for i in LAYERS:
                imp[i] += float(torch.mean(free.features[i].weight.grad ** 2)) * len(x) / len(val)
        scores, owners, svd, fits = [], [], {}, {}
        for i in LAYERS:
            Wf, W = free.features[i].weight.detach(), self.base.features[i].weight.detach()
            rows = W.flatten(1)
            r = (Wf.flatten(1) * rows).sum(1) / (rows ** 2).sum(1).clamp(min=1e-20)
            rv = r.view(-1, *[1] * (W.dim() - 1))
            if self.scalings == "authors":  # their (out, 1) view broadcast against each (out,) column
                cols = [W[:, c] for c in range(W.shape[1])]
                fcols = [Wf[:, c] for c in range(W.shape[1])]
                view = rv.view(-1, 1) if W.dim() == 2 else rv
                s = torch.stack([(view * a * b).sum() / ((view * a) ** 2).sum().clamp(min=1e-20)
                                 for a, b in zip(cols, fcols)])
            else:  # the column least-squares fit given r
                s = (rv * W * Wf).sum([d for d in range(W.dim()) if d != 1]) / \
                    ((rv * W) ** 2).sum([d for d in range(W.dim()) if d != 1]).clamp(min=1e-20)
            D = Wf - s.view(1, -1, *[1] * (W.dim() - 2)) * W * rv
            if D.dim() == 4:
                D = D.flatten(2).mean(2)
            U, S, V = torch.svd(D)
            area = W.shape[2] * W.shape[3] if W.dim() == 4 else 1
            scores.append(area * S ** 2 * imp[i])
            owners += [i] * len(S)
            svd[i], fits[i] = (U, S, V), (r, s)
        allv = torch.cat(scores)
        desc, order = allv.sort(descending=True)
        share = desc.cumsum(0) / desc.cumsum(0)[-1]
        cut = int(np.argmax((share > RATE).numpy()))
        kept = [owners[j] for j in order[: cut + 1].tolist()]
        task = {"ranks": {}, "layers": {}}
        for i in LAYERS:
            k = min(max(kept.count(i), 1), UPPER)
            U, S, V = svd[i]
            r, s = fits[i]
            task["ranks"][i] = k
            task["layers"][i] = {n: nn.Parameter(v.clone()) for n, v in
                                 (("r", r), ("s", s), ("Vt", V[:, :k].T * S[:k].sqrt().view(-1, 1)),
                                  ("U", U[:, :k] * S[:k].sqrt().view(1, -1)),
                                  ("bias", free.features[i].bias.detach()))}
        task["bns"] = {i: free.features[i] for i in BNS}
        task["head"] = free.last
        self.tasks.append(task)
        t = len(self.tasks)
        net = self.task_net(t)
        params = [p for L in task["layers"].values() for p in L.values()]
        params += [p for bn in task["bns"].values() for p in bn.parameters()] + list(task["head"].parameters())

        def loss(out, y):
            reg = sum((p ** 2).sum() / 2 for L in task["layers"].values() for n, p in L.items() if n != "bias")
            l1 = sum(p.abs().sum() for L in task["layers"].values() for n, p in L.items() if n in ("U", "Vt"))
            return F.cross_entropy(out, y) + L1 * l1 + WD * reg

        adam_steps(params, train, E - ER, loss, net)
        for p in params:
            p.requires_grad = False
        self.prune()

    def task_net(self, t: int) -> nn.Module:
        if t == 0:
            return self.base
        task = self.tasks[t - 1]
        net = copy.deepcopy(self.base)
        for i in LAYERS:
            L, W = task["layers"][i], self.base.features[i].weight
            if W.dim() == 4:
                net.features[i] = PerturbedConv(W, L["bias"], L["r"], L["s"], L["Vt"], L["U"], 1)
            else:
                net.features[i] = PerturbedLinear(W, L["bias"], L["r"], L["s"], L["Vt"], L["U"])
        for i in BNS:
            net.features[i] = task["bns"][i]
        net.last = task["head"]
        return net

    def count(self, sparse: bool) -> int:
        n = self.base_size
        for task in self.tasks:
            for L in task["layers"].values():
                n += L["r"].numel() + L["s"].numel()
                for key in ("U", "Vt"):
                    n += int((L[key].abs() > 1e-8).sum()) if sparse else L[key].numel()
            n += sum(p.numel() for bn in task["bns"].values() for p in bn.parameters())
            n += sum(p.numel() for p in task["head"].parameters())
        return n

    def prune(self):
        growth = self.count(sparse=False) / self.base_size - 1
        if growth < 1 - PRUNE[1]:
            return
        rate = 1 - (1 - PRUNE[1]) / growth
        with torch.no_grad():
            for task in self.tasks:
                mags = torch.cat([L[k].reshape(-1) for L in task["layers"].values() for k in ("Vt", "U")]).abs()
                thr = max(float(np.percentile(mags.numpy(), rate * 100)), PRUNE[0])
                for L in task["layers"].values():
                    for k in ("Vt", "U"):
                        L[k].mul_(L[k].abs() > thr)

    def accuracy(self, t: int, loader) -> float:
        net = self.task_net(t).eval()
        with torch.no_grad():
            return 100.0 * sum(int((net(x).argmax(1) == y).sum()) for x, y in loader) / sum(len(y) for _, y in loader)


# --------------------------------------------------------------------------- the comparison
@pytest.mark.parametrize("scalings", ["least_squares", "authors"])
def test_learner_is_the_authors_agent_step_for_step(scalings):
    data = stream()
    torch.manual_seed(0)
    base = Net().double()
    theirs = AuthorsAgent(copy.deepcopy(base), scalings)
    cfg = HALRPConfig(epochs=E, est_rank_epochs=ER, lr=LR, wd=WD, l1=L1, approx_rate=RATE, upper_rank=UPPER,
                      prune="mixAR_AllLayer", prune_value=PRUNE, prune_bound_all_tasks=True, n_tasks=N_TASKS,
                      valid_frac=VALID, dtype="float64", svd="exact", channels_last=False, scalings=scalings)
    learner = HALRPLearner(base, cfg)
    model = learner.model
    heads, add_task = [], model.add_task

    def add_task_and_record(num_classes):  # their fresh head is ours: the same initial weights
        t = add_task(num_classes)
        heads.append(copy.deepcopy(model.heads.heads[t]))
        return t

    model.add_task = add_task_and_record
    for t, (train, val, _) in enumerate(data):
        report = learner.learn_task(train, val, 4)
        if t == 0:
            theirs.learn_base(train)
        else:
            theirs.learn_task(heads[t - 1], train, val)
            assert report.ranks == {f"features.{i}": k for i, k in theirs.tasks[t - 1]["ranks"].items()}
        for j in range(t + 1):
            assert learner.evaluate(data[j][2], j) == theirs.accuracy(j, data[j][2])
    assert learner.parameter_growth() == pytest.approx(theirs.count(sparse=True) / theirs.base_size - 1, abs=0)
    assert learner.reports[-1].prune_rate is not None  # the bound was reached: pruning ran
    layers = model.perturbed_layers()
    for t, task in enumerate(theirs.tasks, start=1):
        for i in LAYERS:
            L, W = task["layers"][i], theirs.base.features[i].weight
            merged = L["r"].view(-1, *[1] * (W.dim() - 1)) * W * L["s"].view(1, -1, *[1] * (W.dim() - 2))
            merged = merged + (L["U"] @ L["Vt"]).view(*W.shape[:2], *[1] * (W.dim() - 2))
            torch.testing.assert_close(layers[f"features.{i}"].merged_weight(t), merged, rtol=0, atol=1e-9)
        for i, b in zip(LAYERS, BNS):
            # A bias right before a BatchNorm gets gradients of rounding noise only (~1e-17), which Adam normalises
            # into steps of up to lr, so both biases and the BatchNorm running means drift by noise; the outputs
            # depend on their difference, which must agree.
            ours_bn, their_bn = model.model.features[b].bns[t].state_dict(), task["bns"][b].state_dict()
            bias, their_bias = layers[f"features.{i}"].task_bias[str(t)], task["layers"][i]["bias"]
            torch.testing.assert_close(bias - ours_bn["running_mean"], their_bias - their_bn["running_mean"],
                                       rtol=0, atol=1e-9)
            torch.testing.assert_close(bias, their_bias, rtol=0, atol=1e-7)
            for k, v in their_bn.items():
                if k != "running_mean":
                    torch.testing.assert_close(ours_bn[k], v, rtol=0, atol=1e-9, msg=k)
        torch.testing.assert_close(model.heads.heads[t].weight, task["head"].weight, rtol=0, atol=1e-9)
