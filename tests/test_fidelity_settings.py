"""The defaults are the paper's: HALRPConfig(), every benchmark and network against the authors' run scripts
(lijiaqi/HALRP scripts/*_HALRP.sh, restated here as literal values), and the optimiser and schedule they use."""
import pytest
import torch

from halrp_fast.continual import HALRPConfig
from halrp_fast.data import benchmarks

# scripts/<name>.sh → (epochs, batch, lr, wd_rate, l1_hyp, approxiRate, upper_rank, estRank_epoch, prune_value,
# valid_size, tasks in the schedule's formula)
SCRIPTS = {
    ("pmnist", "lenet"): (12, 128, 1e-3, 1e-3, 1e-6, 0.9, 100, 1, (1e-5, 0.40), 0.2, 10),
    ("cifar100-splits", "lenet"): (20, 128, 1e-3, 1e-4, 1e-4, 0.9, 100, 1, (1e-5, 0.80), 0.2, 10),
    ("cifar100-superclass", "lenet"): (20, 128, 1e-3, 1e-4, 1e-4, 0.9, 100, 1, (1e-5, 0.80), 0.2, 20),
    ("five-datasets", "alexnet"): (12, 128, 1e-3, 1e-4, 1e-6, 0.9, 100, 1, (1e-5, 0.40), 0.2, 5),
    ("five-datasets", "resnet18"): (12, 128, 1e-3, 1e-4, 1e-6, 0.95, 120, 3, (1e-5, 0.40), 0.2, 5),
    ("tinyimagenet-20", "alexnet"): (50, 32, 1e-3, 5e-4, 1e-5, 0.9, 100, 25, (1e-5, 0.40), 0.1, 20),
    ("tinyimagenet-20", "resnet18"): (50, 32, 5e-4, 1e-4, 5e-4, 0.9, 100, 25, (1e-5, 0.40), 0.1, 20),
    ("tinyimagenet-40", "alexnet"): (50, 32, 1e-3, 1e-4, 5e-4, 0.9, 100, 20, (1e-5, 0.40), 0.1, 40),
    ("tinyimagenet-40", "resnet18"): (50, 32, 5e-4, 1e-4, 5e-4, 0.9, 100, 25, (1e-5, 0.40), 0.1, 40),
}
# benchmarks outside the paper run the PMNIST script's settings
OWN = {"pfmnist": 10, "pdigits": 10, "split-fmnist": 5}


def _settings(cfg: HALRPConfig, batch: int) -> tuple:
    return (cfg.epochs, batch, cfg.lr, cfg.wd, cfg.l1, cfg.approx_rate, cfg.upper_rank, cfg.est_rank_epochs,
            tuple(cfg.prune_value), cfg.valid_frac, cfg.n_tasks)


@pytest.mark.parametrize("key", list(SCRIPTS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_benchmark_settings_are_the_scripts(key):
    name, model = key
    bench = benchmarks.get(name)
    cfg = HALRPConfig(**bench.config_for(model))
    assert _settings(cfg, bench.batch_size) == SCRIPTS[key]
    assert (cfg.optimizer, cfg.prune, cfg.prune_bound_all_tasks, cfg.paper_schedule, cfg.rank_mode) == \
        ("adam", "mixAR_AllLayer", True, True, "hessian")
    if model == bench.model:
        assert bench.config_for() == bench.config_for(model)


@pytest.mark.parametrize("name", list(OWN))
def test_other_benchmarks_take_the_pmnist_script(name):
    bench = benchmarks.get(name)
    expected = SCRIPTS[("pmnist", "lenet")][:-1] + (OWN[name],)
    assert _settings(HALRPConfig(**bench.config_for()), bench.batch_size) == expected


def test_default_config_is_the_pmnist_script():
    assert _settings(HALRPConfig(), 128) == SCRIPTS[("pmnist", "lenet")]
    cfg = HALRPConfig()
    assert (cfg.optimizer, cfg.prune, cfg.prune_bound_all_tasks, cfg.paper_schedule) == \
        ("adam", "mixAR_AllLayer", True, True)
    # run_pmnist.py: gamma = 0.95 ** (batch / (50000 / n_task * train_size * (1 - valid_size))) per iteration
    assert cfg.schedule_gamma(128) == pytest.approx(0.95 ** (128 / 4000), rel=1e-15)
    sub = HALRPConfig(train_frac=0.5, n_tasks=5, valid_frac=0.1)
    assert sub.schedule_gamma(32) == pytest.approx(0.95 ** (32 / (50000 / 5 * 0.5 * 0.9)), rel=1e-15)


def test_adam_eps_is_the_authors_tenfold_gradients():
    """The authors multiply every gradient by 10 before Adam's step (eps 1e-8): the same steps as Adam with eps 1e-9
    (checked on gradients small enough for eps to matter)."""
    torch.manual_seed(0)
    start = torch.randn(50, dtype=torch.float64)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_a = torch.optim.Adam([a], lr=1e-3, eps=1e-8)
    opt_b = torch.optim.Adam([b], lr=1e-3, eps=HALRPConfig().adam_eps)
    for _ in range(20):
        g = 1e-9 * torch.randn(50, dtype=torch.float64)
        a.grad, b.grad = 10 * g, g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert (a - start).abs().max() > 1e-4  # eps mattered: the steps are not the plain ±lr of large gradients
    from halrp_fast.continual.training import make_optimizer

    assert make_optimizer([torch.nn.Parameter(start)], HALRPConfig()).defaults["eps"] == 1e-9


@pytest.mark.parametrize("as_list", [False, True], ids=["loader", "list of batches"])
def test_learning_rate_decays_per_iteration_and_restarts_per_phase(monkeypatch, as_list):
    """run_*.py: ExponentialLR stepped after every optimiser step, a new optimiser and schedule per phase."""
    from halrp_fast.continual import training

    seen = []

    def recording(params, cfg):
        opt = make(params, cfg)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    make = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", recording)
    w = torch.nn.Parameter(torch.zeros(3, 2))
    data = [(torch.randn(40, 3), torch.randint(0, 2, (40,))) for _ in range(3)]
    loader = data if as_list else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
        batch_size=40)
    cfg = HALRPConfig(lr=1e-2, n_tasks=10, valid_frac=0.2)
    for _ in range(2):  # two phases
        training.train(lambda x: x @ w, [w], loader, 2, cfg)
    gamma = 0.95 ** (40 / 4000)
    expected = [1e-2 * gamma**i for i in range(6)]
    assert seen == pytest.approx(expected * 2, rel=1e-12)


def test_command_line_takes_the_benchmark_and_network_settings():
    from halrp_fast.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    five = benchmarks.get("five-datasets")
    cfg = _config_from_args(five, parse(["run", "--benchmark", "five-datasets", "--out", "o", "--model", "resnet18"]))
    assert (cfg.approx_rate, cfg.upper_rank, cfg.est_rank_epochs, cfg.wd) == (0.95, 120, 3, 1e-4)
    cfg = _config_from_args(five, parse(["run", "--benchmark", "five-datasets", "--out", "o", "--subset", "0.5"]))
    assert (cfg.approx_rate, cfg.train_frac, cfg.paper_schedule) == (0.9, 0.5, True)
    cfg = _config_from_args(benchmarks.get("pdigits"), parse(["demo", "--schedule", "epoch", "--lr-decay", "0.9"]))
    assert (cfg.paper_schedule, cfg.lr_decay) == (False, 0.9)
