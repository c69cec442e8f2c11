"""The command line says what it does: every HALRPConfig field has a flag (or is named as set by the benchmark, with
the reason), every option has its help, ``demo`` offers only what applies to it, and a failed run leaves no empty
output directory."""
import argparse
import dataclasses

import pytest

from halrp_fast.cli import API_ONLY, CONFIG_FLAGS, PLAIN_FLAGS, _config_from_args, build_parser, main
from halrp_fast.continual import HALRPConfig
from halrp_fast.data import benchmarks


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _options(name: str) -> dict[str, argparse.Action]:
    return {flag: a for a in _subparser(name)._actions for flag in a.option_strings}


def test_every_config_field_is_a_flag_or_named_as_the_benchmarks():
    fields = {f.name for f in dataclasses.fields(HALRPConfig)}
    assert set(CONFIG_FLAGS) | set(API_ONLY) == fields and not set(CONFIG_FLAGS) & set(API_ONLY)
    assert set(PLAIN_FLAGS) <= set(CONFIG_FLAGS) and all(API_ONLY.values())
    run = _options("run")
    for field, flags in CONFIG_FLAGS.items():
        for flag in flags.split(" / "):
            assert flag in run, (field, flag)
        if field in PLAIN_FLAGS:
            assert run[flags].dest == field


@pytest.mark.parametrize("command", ["run", "demo"])
def test_every_option_says_what_it_does(command):
    missing = [flag for flag, action in _options(command).items() if flag not in ("-h", "--help")
               and not (action.help or "").strip()]
    assert not missing


def test_demo_offers_only_what_applies_to_the_embedded_stream():
    demo = _options("demo")
    for flag in ("--data-dir", "--order", "--orders", "--distributed", "--task-parallel", "--benchmark"):
        assert flag not in demo


@pytest.mark.parametrize("flags, field, value", [(["--svd", "exact"], "svd", "exact"),
                                                 (["--adam-eps", "1e-7"], "adam_eps", 1e-7),
                                                 (["--optimizer", "sgd", "--momentum", "0.5"], "momentum", 0.5)])
def test_config_flags_reach_the_config(flags, field, value):
    args = build_parser().parse_args(["demo", *flags])
    assert getattr(_config_from_args(benchmarks.get("pdigits"), args), field) == value


def test_a_failed_run_leaves_no_empty_output_directory(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["demo", "--out", str(out), "--max-per-task", "4", "--no-progress", "--quiet"]) == 2
    assert "no full batch" in capsys.readouterr().err and not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["demo", "--out", str(kept), "--max-per-task", "4", "--no-progress", "--quiet"]) == 2
    assert kept.is_dir()  # a directory the user made stays
