"""Metrics on hand-made accuracy tables."""
import math

import pytest

from halrp_fast import metrics

A = [[90.0, None, None], [85.0, 80.0, None], [70.0, 82.0, 75.0]]


def test_acc_bwt_forgetting_by_hand():
    assert metrics.average_accuracy(A) == pytest.approx((70 + 82 + 75) / 3)
    assert metrics.backward_transfer(A) == pytest.approx(((70 - 90) + (82 - 80)) / 2)
    # forgetting: task 0 max(90, 85) − 70 = 20; task 1 max(80) − 82 = −2
    assert metrics.forgetting(A) == pytest.approx((20 - 2) / 2)
    assert metrics.final_accuracies(A) == [70.0, 82.0, 75.0]
    assert metrics.backward_transfer([[50.0]]) == 0.0


def test_order_robustness_maps_positions_to_task_identity():
    orders = {"A": [0, 1, 2], "B": [2, 0, 1]}
    finals = {"A": [90.0, 80.0, 70.0], "B": [75.0, 88.0, 81.0]}
    # task 0: 90 vs 88 → 2; task 1: 80 vs 81 → 1; task 2: 70 vs 75 → 5
    r = metrics.order_robustness(finals, orders)
    assert r["OPD"] == {0: 2.0, 1: 1.0, 2: 5.0}
    assert r["AOPD"] == pytest.approx(8 / 3) and r["MOPD"] == 5.0


def test_bad_tables():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="same ≥ 2 orders"):
        metrics.order_robustness({"A": [1.0]}, {"A": [0]})
    with pytest.raises(ValueError, match="same task identities"):
        metrics.order_robustness({"A": [1.0, 2.0], "B": [1.0, 2.0]}, {"A": [0, 1], "B": [0, 2]})
    assert math.isfinite(metrics.forgetting(A))
