"""Every package the setup installs comes at a tested version: the constraints file pins each requirement."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name), \
                f"constraints.txt: {line!r} is not NAME==VERSION"
            out[canonical(name)] = version
    return out


def requirement_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    reqs += tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def test_every_requirement_is_pinned():
    missing = requirement_names() - set(pins())
    assert not missing, f"requirements with no tested version in constraints.txt: {sorted(missing)}"


def test_the_setup_and_ci_install_through_the_constraints():
    setup = (ROOT / "README.md").read_text().split("## Setup", 1)[1].split("\n## ", 1)[0]
    install = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0]
    installs = [part for part in install.split("&&") if "pip install" in part]
    assert installs and all("-c constraints.txt" in part for part in installs), installs
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
