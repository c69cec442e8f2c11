"""tune_cpu_allocator: applied on glibc, reported by env_report, chosen by the CLI's --cpu-allocator."""
import platform

import pytest
import torch

import halrp_fast
from halrp_fast import cpu_allocator
from halrp_fast.cli import build_parser

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tune_applies_on_glibc_and_is_reported():
    assert halrp_fast.tune_cpu_allocator() is True
    assert halrp_fast.tune_cpu_allocator() is True  # idempotent
    assert cpu_allocator.cpu_allocator_state().startswith("tuned")
    assert "cpu allocator: tuned" in halrp_fast.env_report()
    # malloc still works for large and small tensors after the change
    big = torch.ones(8 * 2**20)
    assert float(big.sum()) == 8 * 2**20


def test_non_glibc_is_a_clean_no(monkeypatch):
    monkeypatch.setattr(cpu_allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(cpu_allocator, "_state", {"tuned": False, "why": "not requested"})
    assert cpu_allocator.tune_cpu_allocator() is False
    assert cpu_allocator.cpu_allocator_state().startswith("default (not glibc")


def test_choice_validation_and_cli_option():
    with pytest.raises(ValueError, match="cpu allocator must be one of"):
        cpu_allocator.apply_choice("jemalloc")
    assert cpu_allocator.apply_choice("default") is False
    args = build_parser().parse_args(["demo"])
    assert args.cpu_allocator == "tuned"
    args = build_parser().parse_args(["demo", "--cpu-allocator", "default"])
    assert args.cpu_allocator == "default"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--cpu-allocator", "other"])
