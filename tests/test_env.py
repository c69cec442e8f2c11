"""Provider selection, env_report and the CLI's env command."""
import os
import subprocess
import sys

import pytest
import torch

import halrp_fast as hf
from halrp_fast import _backend


def test_env_report_names_every_op_and_provider():
    report = hf.env_report()
    for op in _backend.OPS:
        assert op in report
    assert "reference" in report and "cpu" in report


def test_import_does_not_import_triton():
    code = "import sys, halrp_fast; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="HALRP_FAST_BACKEND='nonsense' names no provider"):
        hf.perturbed_linear(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2), torch.ones(3),
                            torch.zeros(2, 0), torch.zeros(3, 0))


def test_registered_provider_serves_and_falls_back(monkeypatch):
    calls = []

    def fake_linear(*args):
        calls.append("linear")
        return _backend.reference.perturbed_linear(*args)

    provider = _backend.Provider(name="probe", devices=("cpu",), load=lambda: {"perturbed_linear": fake_linear},
                                 auto=False)
    _backend.register_provider(provider)
    try:
        monkeypatch.setenv(_backend.ENV_VAR, "probe")
        x = torch.randn(2, 3, requires_grad=True)
        y = hf.perturbed_linear(x, torch.randn(2, 3), torch.ones(2), torch.ones(3), torch.zeros(2, 0),
                                torch.zeros(3, 0))
        y.sum().backward()  # the backward op falls back to reference
        assert calls == ["linear"]
        assert "probe" in hf.env_report()
    finally:
        _backend._PROVIDERS.pop("probe")
        _backend._SELECTION.clear()


@pytest.mark.parametrize("priority", ["named", "auto"])
def test_registered_provider_serves_every_path(monkeypatch, priority):
    """A provider registered through the public API serves the eager call, torch.ops.halrp and torch.compile
    alike, forward and backward (named in HALRP_FAST_BACKEND, or picked by auto mode for its priority)."""
    from halrp_fast import reference

    calls = []

    def probe(op):
        return lambda *args: calls.append(op) or getattr(reference, op)(*args)

    ops = ("perturbed_linear_mt", "perturbed_linear_mt_backward")
    provider = hf.Provider(name="probe", devices=("cpu",), load=lambda: {op: probe(op) for op in ops},
                           priority=1000, auto=priority == "auto")
    hf.register_provider(provider)
    try:
        if priority == "named":
            monkeypatch.setenv(_backend.ENV_VAR, "probe")
        W, ids = torch.randn(3, 4), torch.tensor([1, 0])
        banks = (torch.ones(2, 3), torch.ones(2, 4), torch.randn(2, 3, 2), torch.randn(2, 4, 2), torch.randn(2, 3))
        x = torch.randn(2, 4, requires_grad=True)

        hf.perturbed_linear_mt(x, ids, W, *banks).sum().backward()
        assert calls == list(ops), "eager"
        calls.clear()
        torch.ops.halrp.perturbed_linear_mt(x, ids, W, *banks, True)[0].sum().backward()
        assert calls == list(ops), "torch.ops"
        calls.clear()
        compiled = torch.compile(lambda x: hf.perturbed_linear_mt(x, ids, W, *banks), fullgraph=True,
                                 backend="aot_eager")
        compiled(x).sum().backward()
        assert calls == list(ops), "torch.compile"
    finally:
        _backend._PROVIDERS.pop("probe")
        _backend._SELECTION.clear()


@pytest.mark.parametrize("mode", ["auto", "probe"])
def test_provider_serves_only_its_dtypes(monkeypatch, mode):
    calls = []

    def fake_linear(*args):
        calls.append(args[0].dtype)
        return _backend.reference.perturbed_linear(*args)

    provider = _backend.Provider(name="probe", devices=("cpu",), load=lambda: {"perturbed_linear": fake_linear},
                                 priority=1000, dtypes=("float32",))
    _backend.register_provider(provider)
    try:
        monkeypatch.setenv(_backend.ENV_VAR, mode)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(2, 3, dtype=dtype)
            y = hf.perturbed_linear(x, torch.randn(2, 3, dtype=dtype), torch.ones(2, dtype=dtype),
                                    torch.ones(3, dtype=dtype), torch.zeros(2, 1, dtype=dtype),
                                    torch.zeros(3, 1, dtype=dtype))
            assert y.dtype == dtype
        assert calls == [torch.float32]  # float64 went to the next provider (auto) or to reference (named)
        assert _backend.select("perturbed_linear", "cpu", "float64")[0] != "probe"
        assert "dtypes=float32" in hf.env_report()
    finally:
        _backend._PROVIDERS.pop("probe")
        _backend._SELECTION.clear()


def test_unavailable_provider_reports_why(monkeypatch):
    def load():
        raise ImportError("no module named 'imaginary'")

    _backend.register_provider(_backend.Provider(name="broken", devices=("cpu",), load=load, auto=False))
    try:
        assert "unavailable (ImportError: no module named 'imaginary')" in hf.env_report()
        monkeypatch.setenv(_backend.ENV_VAR, "broken")
        with pytest.raises(RuntimeError, match="broken is not available"):
            hf.perturbed_linear(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2), torch.ones(3),
                                torch.zeros(2, 0), torch.zeros(3, 0))
    finally:
        _backend._PROVIDERS.pop("broken")
        _backend._SELECTION.clear()


def test_cli_env():
    out = subprocess.run([sys.executable, "-m", "halrp_fast.cli", "env"], capture_output=True, text=True, check=True)
    assert "perturbed_conv2d_mt" in out.stdout


def test_without_the_extension_the_package_imports_and_says_why():
    code = ("import halrp_fast, torch; print(halrp_fast.env_report()); "
            "print(torch.ops.halrp.fit_scalings(torch.ones(2, 3), torch.ones(2, 3)))")
    env = {**os.environ, "HALRP_FAST_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "unavailable (ImportError: halrp_fast._C disabled by HALRP_FAST_NO_EXT=1)" in out
    assert "fit_scalings                   cpu   -> reference" in out
