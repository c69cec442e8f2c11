"""The README's setup and test commands are the ones CI runs."""
import re
from pathlib import Path

from halrp_fast import _backend

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Setup", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_two_commands_and_ci_runs_them():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write checkpoints under ./runs
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    providers = dict(_backend._PROVIDERS)  # an example registers its own provider: keep it out of later tests
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    finally:
        _backend._PROVIDERS.clear()
        _backend._PROVIDERS.update(providers)
        _backend._SELECTION.clear()
