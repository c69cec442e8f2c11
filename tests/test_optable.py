"""The op table is the one source: the registered ops, every provider's map and the compiled kernels' schemas are
derived from it or checked against it, and forcing a provider says which ops it leaves to another."""
import inspect
import warnings

import pytest
import torch

import halrp_fast as hf
from halrp_fast import _backend, _ext, _optable, reference


def n_arguments(schema: str) -> int:
    return len(torch._C.parse_schema(f"op{schema}").arguments)


def test_every_op_is_registered_with_the_tables_schema():
    for op in _optable.OPS:
        schema = getattr(torch.ops.halrp, op).default._schema
        assert _ext.schema_mismatch(schema, _optable.SCHEMAS[op]) is None, op


@pytest.mark.parametrize("module", ["reference", "triton"])
def test_python_providers_take_each_ops_arguments(module):
    """A provider function takes the schema's arguments (by count: names of saved tensors differ per provider)."""
    if module == "reference":
        impls = {op: getattr(reference, op) for op in _optable.OPS}
    else:
        pytest.importorskip("triton")
        impls = _backend._load_triton()
        assert set(impls) == {s.name for s in _optable.TABLE} | {"perturbed_linear_backward",
                                                                 "perturbed_linear_mt_backward"}
    for op, fn in impls.items():
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        assert len(params) == n_arguments(_optable.SCHEMAS[op]), (module, op)


@pytest.fixture
def extension():
    if _ext.load() is not None:
        pytest.skip(f"halrp_fast._C is not available: {_ext.load()}")


def test_every_compiled_kernel_serves_an_op_with_its_schema(extension):
    kernels = _ext.compiled_kernels()
    assert "linear_mt_cpu" in kernels
    for kernel in kernels:
        expected = _ext.expected_schema(kernel)
        assert expected is not None, f"{kernel} is named after no op of the table"
        schema = getattr(torch.ops._halrp_C, kernel).default._schema
        assert _ext.schema_mismatch(schema, expected) is None


def test_a_kernel_schema_in_another_order_is_caught(extension, monkeypatch):
    swapped = torch._C.parse_schema("linear_mt_cpu(Tensor x, Tensor weight, Tensor task_ids, Tensor R, Tensor S, "
                                    "Tensor U, Tensor V, Tensor? B, bool save) -> (Tensor, Tensor, Tensor)")
    message = _ext.schema_mismatch(swapped, _optable.SCHEMAS["perturbed_linear_mt"])
    assert message is not None and "linear_mt_cpu" in message
    # a built kernel that disagrees with the table makes the provider refuse to load, naming it
    table = dict(_optable.SCHEMAS)
    table["perturbed_linear_mt"] = "(Tensor x, Tensor weight, Tensor task_ids, Tensor R, Tensor S, Tensor U, " \
                                   "Tensor V, Tensor? B, bool save) -> (Tensor, Tensor, Tensor)"
    monkeypatch.setattr(_ext, "SCHEMAS", table)
    with pytest.raises(ImportError, match="linear_mt_cpu.*rebuild|rebuild.*linear_mt_cpu"):
        _ext.provider_impls("cpu")


def test_a_forced_provider_names_every_op_it_leaves_to_another(monkeypatch):
    calls = []
    provider = _backend.Provider(name="probe", devices=("cpu",), auto=False,
                                 load=lambda: {"perturbed_linear": lambda *a: calls.append(1) or
                                               reference.perturbed_linear(*a)})
    _backend.register_provider(provider)
    try:
        monkeypatch.setenv(_backend.ENV_VAR, "probe")
        auto = {op: _backend._choose_auto(op, "cpu", "float32")[0] for op in _optable.OPS}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(2, 3, requires_grad=True)
            hf.perturbed_linear(x, torch.randn(2, 3), torch.ones(2), torch.ones(3), torch.zeros(2, 1),
                                torch.zeros(3, 1)).sum().backward()
            hf.perturbed_linear(x, torch.randn(2, 3), torch.ones(2), torch.ones(3), torch.zeros(2, 1),
                                torch.zeros(3, 1)).sum().backward()
        fallback = [w for w in caught if issubclass(w.category, _backend.ProviderFallbackWarning)]
        assert len(fallback) == 1 and calls == [1, 1]
        text = str(fallback[0].message)
        for op in _optable.OPS:
            if op != "perturbed_linear":
                assert f"{op} -> {auto[op]}" in text  # what auto mode picks, not reference by default
        report = _backend.env_report(("cpu",))
        assert "perturbed_linear_backward      cpu   -> " + auto["perturbed_linear_backward"] + \
               "  (fallback: HALRP_FAST_BACKEND=probe does not implement it)" in report
    finally:
        _backend._PROVIDERS.pop("probe")
        _backend._SELECTION.clear()
        _backend._WARNED.clear()


def test_cuda_ext_leaves_its_missing_ops_to_triton_not_reference():
    pytest.importorskip("triton")
    served = _backend.fallbacks("cuda_ext", "cuda")
    assert "perturbed_linear" in served
    assert {op: who for op, who in served.items() if op in _backend._load_triton()} == \
        {op: "triton" for op in served if op in _backend._load_triton()}
