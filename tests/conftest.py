import os

import pytest
import torch

from halrp_fast import _backend

# Under pytest-xdist each worker takes an equal share of the cores (torch would give every worker all of them), and
# so do the processes it starts (a run's results depend on the number of threads, through the order of float sums).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: every provider an op test runs on, where it can serve CPU tensors here: "cpp" needs the compiled extension,
#: "triton" the Triton interpreter (TRITON_INTERPRET=1, as CI runs; on a GPU machine the same tests take CUDA)
PROVIDERS = ("reference", "cpp", "triton")


class ProviderUnderTest:
    """The provider an op test checks: ``require(op, dtype)`` skips the test unless this provider computes ``op``
    for ``dtype`` on CPU tensors (so that no test passes on a fallback while claiming a provider); during the test
    every provider choice is recorded, and the fixture fails a test in which the provider served no call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.served: list[tuple[str, str]] = []
        self.expect_calls = True  # False for a test form that calls no op (checked once, on "reference")

    def require(self, op: str, dtype: torch.dtype = torch.float32) -> None:
        served = _backend.select(op, "cpu", dtype)[0]
        if served != self.name:
            self.expect_calls = False
            pytest.skip(f"{self.name} does not compute {op} in {dtype} (served by {served})")
        if self.name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            self.expect_calls = False
            pytest.skip("the Triton interpreter computes bfloat16 on raw uint16 bits (triton-lang/triton#11584); "
                        "bfloat16 is checked on a GPU")

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=PROVIDERS)
def provider(request, monkeypatch):
    """Run an op test with HALRP_FAST_BACKEND naming one provider; the test id says which."""
    name = request.param
    p = _backend._PROVIDERS[name]
    if "*" not in p.devices and "cpu" not in p.devices:
        pytest.skip(f"{name} does not serve CPU tensors here (Triton: set TRITON_INTERPRET=1)")
    if p.why_not() is not None:
        pytest.skip(f"{name} is not available: {p.why_not()}")
    monkeypatch.setenv(_backend.ENV_VAR, name)
    under_test = ProviderUnderTest(name)
    choose = _backend._choose

    def recording(op, device_type, want, dtype):
        hit = choose(op, device_type, want, dtype)
        under_test.served.append((op, hit[0]))
        return hit

    monkeypatch.setattr(_backend, "_choose", recording)
    _backend._SELECTION.clear()  # every choice of this test goes through the recorder
    yield under_test
    _backend._SELECTION.clear()
    providers = {who for _, who in under_test.served}
    assert name in providers or not under_test.expect_calls, \
        f"no call of this test was served by {name} (served: {sorted(providers)})"
