"""Runs ``halrp-fast`` with one injected fault (a helper of tests/test_faults.py, run as a subprocess).

FAULT=phase:n kills the process (SIGKILL) at the n-th event of the phase: ``training`` (optimiser steps),
``evaluation`` (accuracy evaluations), ``save`` (checkpoint files written), or sends SIGINT there (``interrupt``,
at the n-th optimiser step). FSIZE=bytes caps the size of every file the process writes (a full disk).
"""
import os
import resource
import signal
import sys

import halrp_fast.continual.checkpoint as checkpoint
import halrp_fast.continual.learner as learner
import halrp_fast.continual.training as training
from halrp_fast.cli import main

phase, _, at = os.environ.get("FAULT", ":0").partition(":")
count = [0]


def hit(sig=signal.SIGKILL):
    count[0] += 1
    if count[0] == int(at):
        os.kill(os.getpid(), sig)


if phase in ("training", "interrupt"):
    make = training.make_optimizer

    def make_and_count(params, cfg):
        opt = make(params, cfg)
        sig = signal.SIGINT if phase == "interrupt" else signal.SIGKILL
        opt.register_step_post_hook(lambda *a: hit(sig))
        return opt

    training.make_optimizer = make_and_count
elif phase == "evaluation":
    evaluate = learner.HALRPLearner.evaluate

    def evaluate_and_count(self, loader, task_id):
        hit()
        return evaluate(self, loader, task_id)

    learner.HALRPLearner.evaluate = evaluate_and_count
elif phase == "save":
    write = checkpoint.atomic_write_bytes

    def write_and_count(path, data):
        write(path, data)
        hit()

    checkpoint.atomic_write_bytes = write_and_count
if "FSIZE" in os.environ:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    limit = int(os.environ["FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[1:]))
