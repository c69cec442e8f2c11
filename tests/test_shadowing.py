"""Nothing in the repository root shadows a third-party top-level module.

``python -m pytest`` (the README's test command) and ``python`` started in the root put the root first on
``sys.path``.  Its folders that Python can import are ``halrp_fast`` (the package itself) and ``kernels`` (the Triton
sources installed as ``halrp_fast.kernels``), which, imported as a top-level ``kernels``, hands that name on to an
installed package of the name (transformers imports one) or to none.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    """``python [flags] -c code`` started in the repository root, which is then first on its ``sys.path``."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_root_holds_no_other_importable_name():
    importable = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    assert importable == {"halrp_fast", "kernels", "setup"}, (
        f"{sorted(importable - {'halrp_fast', 'kernels', 'setup'})} in the repository root would shadow an installed "
        f"module of that name for anything run there")


def test_import_kernels_from_the_root_gets_the_installed_package_or_none():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no package named kernels is installed (transformers brings one)")
    probe = ("import sys; sys.path.insert(0, ''); import kernels, os; print(os.path.abspath(kernels.__file__)); "
             "import halrp_fast.kernels as own; print(os.path.abspath(own.__file__))")
    out = run_in_root(probe)
    assert out.returncode == 0, out.stderr
    got, own = out.stdout.split()
    assert Path(own) == ROOT / "kernels" / "__init__.py"  # the package's own import is untouched
    assert not Path(got).is_relative_to(ROOT / "kernels"), f"`import kernels` in the root gave {got}"


def test_import_kernels_from_the_root_without_an_installed_one_is_module_not_found():
    # -S: no site-packages, so the only `kernels` on sys.path is the root's folder
    probe = ("import sys; sys.path.insert(0, '')\n"
             "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name, "
             "'kernels' in sys.modules)\nelse:\n    print('found', kernels.__file__)")
    out = run_in_root(probe, "-S")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["missing", "kernels", "False"]


def test_transformers_kernel_integration_gets_the_hub_package():
    pytest.importorskip("transformers")
    probe = ("import sys; sys.path.insert(0, ''); import transformers.integrations.hub_kernels as hk, kernels, os; "
             "print(os.path.abspath(kernels.__file__))")
    out = run_in_root(probe)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not Path(out.stdout.split()[-1]).is_relative_to(ROOT / "kernels")
