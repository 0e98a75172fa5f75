"""The report's statistics on hand-made numbers: summaries, paired t-tests, Holm's correction."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sst

from mmray.report import stats


def test_describe_mean_sample_std_and_student_t_interval():
    s = stats.describe([0.8, 0.6, 0.9, 0.7])
    # by hand: mean 0.75; squared deviations 0.0025 + 0.0225 + 0.0225 + 0.0025 = 0.05; / (n-1)
    std = math.sqrt(0.05 / 3)
    assert s.n == 4 and s.mean == pytest.approx(0.75) and s.std == pytest.approx(std)
    q = sst.t.ppf(0.975, 3)
    assert q == pytest.approx(3.182446, abs=1e-6)  # the t table's 97.5% quantile at 3 df
    half = q * std / math.sqrt(4)
    assert s.ci == pytest.approx((0.75 - half, 0.75 + half))
    assert s.ci == pytest.approx((0.5446, 0.9554), abs=1e-4)


def test_one_seed_has_no_std_and_no_interval():
    s = stats.describe([0.7])
    assert (s.n, s.mean, s.std, s.ci) == (1, 0.7, None, None)
    assert "n = 1" in s.note
    assert stats.describe([]).n == 0 and stats.describe([]).mean is None


def test_paired_test_pairs_by_common_seeds():
    method = {"0": 0.8, "1": 0.6, "2": 0.9, "3": 0.7}  # seed 3 has no baseline: dropped
    base = {"0": 0.5, "1": 0.7, "2": 0.6, "5": 0.1}  # seed 5 has no method run: dropped
    r = stats.paired_test(method, base)
    assert r.seeds == ("0", "1", "2") and r.n == 3
    # differences 0.3, -0.1, 0.3: mean 1/6, sd sqrt(((2/15)^2 * 2 + (4/15)^2) / 2)
    mean = 1 / 6
    sd = math.sqrt(((2 / 15) ** 2 * 2 + (4 / 15) ** 2) / 2)
    t = mean / (sd / math.sqrt(3))
    assert t == pytest.approx(1.25)
    assert r.mean_diff == pytest.approx(mean) and r.t == pytest.approx(t)
    assert r.p == pytest.approx(2 * sst.t.sf(t, 2)) and r.p == pytest.approx(0.337734, abs=1e-6)
    half = sst.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert r.ci == pytest.approx((mean - half, mean + half))


def test_paired_test_sign_is_method_minus_baseline():
    r = stats.paired_test({"0": 0.5, "1": 0.6, "2": 0.4}, {"0": 0.7, "1": 0.9, "2": 0.8})
    assert r.mean_diff == pytest.approx(-0.3) and r.t < 0


def test_paired_test_undefined_cases_say_why():
    one = stats.paired_test({"0": 0.9, "1": 0.8}, {"0": 0.5})
    assert one.n == 1 and one.mean_diff == pytest.approx(0.4)
    assert (one.t, one.p, one.ci) == (None, None, None) and "1 pair" in one.note
    # a constant difference (round-off aside): no t-test, but the interval exists (width 0)
    flat = stats.paired_test({"0": 0.9, "1": 0.7}, {"0": 0.8, "1": 0.6})
    assert flat.t is None and flat.p is None and "zero variance" in flat.note
    assert flat.ci == pytest.approx((0.1, 0.1))
    none = stats.paired_test({"0": 0.9}, {"1": 0.5})
    assert none.n == 0 and none.mean_diff is None and "no seed" in none.note


def test_holm_step_down_known_answers():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.3, 0.9, 0.02]) == pytest.approx([0.6, 0.9, 0.06])
    assert stats.holm([0.04]) == [0.04] and stats.holm([]) == []


def test_holm_is_monotone_in_the_raw_order():
    raw = [0.001, 0.2, 0.011, 0.012, 0.5, 0.013]
    adj = stats.holm(raw)
    pairs = sorted(zip(raw, adj))
    assert all(a2 >= a1 for (_, a1), (_, a2) in zip(pairs, pairs[1:]))
    assert all(a >= p for p, a in zip(raw, adj)) and max(adj) <= 1.0
