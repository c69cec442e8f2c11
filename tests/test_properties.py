"""Property tests: random shapes, ranks and task mixes against the float64 oracle."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_close, linear, linear_mt

import halrp_fast as hf

dims = st.integers(min_value=1, max_value=40)
seeds = st.integers(0, 2**16)


def sampler(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(M=st.integers(0, 33), n_in=dims, n_out=dims, k=st.integers(0, 70), bias=st.booleans(), seed=seeds)
def test_linear_random_shapes(M, n_in, n_out, k, bias, seed):
    rnd = sampler(seed)
    x, W, r, s = rnd(M, n_in), rnd(n_out, n_in), rnd(n_out), rnd(n_in)
    U, V = rnd(n_out, k), rnd(n_in, k)
    b = rnd(n_out) if bias else None
    assert_close(hf.perturbed_linear(x, W, r, s, U, V, b), linear(x, W, r, s, U, V, b), torch.float64)


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 4), min_size=1, max_size=12), n_in=dims, n_out=dims, k=st.integers(0, 9),
       seed=seeds)
def test_linear_mt_random_task_mixes(ids, n_in, n_out, k, seed):
    rnd = sampler(seed)
    task_ids = torch.tensor(ids)
    x, W = rnd(len(ids), n_in), rnd(n_out, n_in)
    R, S, U, V, B = rnd(5, n_out), rnd(5, n_in), rnd(5, n_out, k), rnd(5, n_in, k), rnd(5, n_out)
    assert_close(hf.perturbed_linear_mt(x, task_ids, W, R, S, U, V, B), linear_mt(x, task_ids, W, R, S, U, V, B),
                 torch.float64)
