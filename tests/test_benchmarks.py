"""benchmarks/kernel_speed.py's per-round ratios (the spread of interleaved runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kernel_speed", ROOT / "benchmarks" / "kernel_speed.py")
kernel_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_speed)

KEY = ("FC-1 KIP step 100x5000", "float64")


def _run(times):
    return {"colab": {KEY: list(times)}, "rows": {}}


def test_round_ratios_pair_each_nt_run_with_the_kipnb_runs_around_it():
    # kipnb: 1 s, then a slower machine (2 s), then 4 s; neural-tangents 3 s and 6 s.
    per_run = {"kipnb": [_run([1.0, 1.0]), _run([2.0, 2.0]), _run([4.0, 4.0])],
               "nt": [_run([3.0, 3.0, 3.0]), _run([6.0])]}
    ratios = kernel_speed.round_ratios(per_run, "colab", KEY)
    assert ratios == pytest.approx([3.0 / 1.5, 6.0 / 3.0])  # medians of the pooled neighbours
    row = {}
    kernel_speed.add_rounds(row, "speedup_kipnb_over_nt", ratios + [1.0])
    assert row["speedup_kipnb_over_nt_rounds"] == pytest.approx([2.0, 2.0, 1.0])
    assert (row["speedup_kipnb_over_nt_min"], row["speedup_kipnb_over_nt_max"]) == (1.0, 2.0)
    assert row["speedup_kipnb_over_nt_median_of_rounds"] == 2.0


def test_round_ratios_without_neural_tangents_are_empty():
    assert kernel_speed.round_ratios({"kipnb": [_run([1.0])]}, "colab", KEY) == []


def test_rounds_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        kernel_speed.main(["--out", "x.json", "--rounds", "0"])
    assert "--rounds 0: need at least 1 round" in capsys.readouterr().err
