"""bench/transfer_experiment.py: the statistics over seeds (t-intervals, paired differences) and
what a seed varies, on known inputs. The experiment itself takes tens of minutes; these take none."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import transfer_experiment as tx  # noqa: E402

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977987


def test_t_interval_of_known_values() -> None:
    out = tx.t_interval([1.0, 2.0, 3.0])
    assert out["n"] == 3 and out["mean"] == 2.0 and out["std"] == pytest.approx(1.0)
    half = T_975_DF2 / math.sqrt(3)  # 2.4841...
    assert out["ci_low"] == pytest.approx(2.0 - half) and out["ci_high"] == pytest.approx(2.0 + half)
    assert out["ci_low"] == pytest.approx(-0.4841, abs=1e-4)


def test_t_interval_is_wider_than_a_normal_interval_with_few_seeds() -> None:
    values = [86.1, 86.4, 86.9, 86.5, 86.6]
    out = tx.t_interval(values)
    sem = np.std(values, ddof=1) / math.sqrt(5)
    assert out["ci_high"] - out["mean"] == pytest.approx(T_975_DF4 * sem)
    assert out["ci_high"] - out["mean"] > 1.96 * sem


def test_one_seed_has_no_interval() -> None:
    out = tx.t_interval([85.4])
    assert out["mean"] == 85.4 and out["std"] is None and out["ci_low"] is None
    assert tx.paired([85.4], [54.2])["separated"] is None


def test_paired_differences_are_taken_seed_by_seed() -> None:
    # b moves with a from seed to seed (as methods sharing a seed do): unpaired intervals overlap,
    # the paired one separates.
    a, b = [80.0, 85.0, 90.0], [79.0, 83.9, 89.1]
    out = tx.paired(a, b)
    assert out["values"] == pytest.approx([1.0, 1.1, 0.9])
    assert out["separated"] is True and out["ci_low"] > 0
    ia, ib = tx.t_interval(a), tx.t_interval(b)
    assert ia["ci_low"] < ib["ci_high"]  # the cells alone do not separate
    assert tx.paired([86.7, 86.8, 86.5], [86.7, 86.6, 86.9])["separated"] is False
    with pytest.raises(ValueError):
        tx.paired([1.0, 2.0], [1.0])


def test_seed_zero_keeps_the_single_seed_run_and_other_seeds_do_not_share_streams() -> None:
    assert tx.seed_streams(0) == {"init": 0, "fresh_lambda": 1, "train": 0, "test": 0, "val": 1}
    used = [set(tx.seed_streams(s).values()) for s in range(5)]
    assert all(not (used[i] & used[j]) for i in range(5) for j in range(i + 1, 5))
    train, val = tx.seed_split(12, 10, 0)
    assert train.tolist() == list(range(10)) and val.tolist() == [10, 11]
    for seed in (1, 2):
        train, val = tx.seed_split(12, 10, seed)
        assert sorted([*train, *val]) == list(range(12)) and len(val) == 2
    assert tx.seed_split(1000, 800, 1)[1].tolist() != tx.seed_split(1000, 800, 2)[1].tolist()


def _run(accuracy: dict[str, dict[str, float]], selected: str) -> dict[str, Any]:
    """One seed's results in the experiment's layout: every method scores ``accuracy`` in both settings."""
    test = {
        "accuracy": accuracy,
        "lambda_mean_weight": {"identity": 0.5, "rot90": 0.5},
        "lambda_share_upright_max": 0.5,
    }
    fine = {name: {"test": test, "val_random": {}} for name, *_ in tx.FINE_TUNED}
    group = {"zero_shot": {"test": test}, "fine_tuned": {**fine, "lambda_selected": selected}}
    return {"groups": {g: group for g in tx.GROUPS}}


def test_summary_reads_the_selected_lambda_start_per_seed() -> None:
    runs = {}
    for seed, lam in (("0", 0.80), ("1", 0.82), ("2", 0.84)):
        acc = {m: {"upright": 0.9, "random": 0.5, "every": 0.5} for m in tx.METHOD_ORDER}
        acc["lambda"] = {"upright": 0.9, "random": lam, "every": lam}
        runs[seed] = _run(acc, "lambda_from_equitune")
    summary = tx.summarize(runs)
    cell = summary["table"]["c4"]["fine_tuned"]["random"]["lambda"]
    assert cell["values"] == pytest.approx([80.0, 82.0, 84.0]) and cell["mean"] == pytest.approx(82.0)
    assert cell["ci_low"] == pytest.approx(82.0 - T_975_DF2 * 2.0 / math.sqrt(3))
    claim = next(c for c in summary["claims"] if c["group"] == "d4" and c["a"] == ["zero_shot", "lambda"]
                 and c["b"] == ["zero_shot", "vanilla"])  # fmt: skip
    assert claim["values"] == pytest.approx([30.0, 32.0, 34.0]) and claim["separated"] is True
    assert summary["lambda_selected"]["c4"] == ["lambda_from_equitune"] * 3
