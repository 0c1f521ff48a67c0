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


def _report(rounds=1):
    def row(case, dtype, k, n, kf=None, nf=None):
        r = {"case": case, "dtype": dtype,
             "kipnb": {"median_s": k, "first_call_s": kf or k, "timed_calls": 1},
             "nt": {"median_s": n, "first_call_s": nf or n, "timed_calls": 1},
             "speedup_kipnb_over_nt": n / k,
             "first_call_speedup_kipnb_over_nt": (nf or n) / (kf or k)}
        if rounds > 1:
            kernel_speed.add_rounds(r, "speedup_kipnb_over_nt", [0.5 * n / k, 1.5 * n / k])
        return r

    return {"created": "2026-12-06T10:21:00+00:00", "commit": "1a0d0614951f", "wall_time_s": 463.2,
            "machine": {"cpu_count": 2}, "kipnb": {"jax": "0.10.2"},
            "neural_tangents": {"jax": "0.4.30"}, "settings": {"rounds": rounds},
            "colab_results": [row("FC-1 KIP step: XLA compile", "float32", 0.5, 0.4),
                              row("FC-1 KIP step 100x5000", "float64", 0.04, 0.07, 0.7, 0.6)]}


@pytest.mark.parametrize("rounds, compile_line, step_line", [
    (1, "| FC-1 KIP step: XLA compile | float32 | 0.500 | 0.400 | **0.80×** | – | – |",
     "| FC-1 KIP step 100x5000 | float64 | 0.040 | 0.070 | 1.75× | 0.700 / 0.600 | **0.86×** |"),
    (2, "| FC-1 KIP step: XLA compile | float32 | 0.500 | 0.400 | **0.80×** (0.40-1.20) | – | – |",
     "| FC-1 KIP step 100x5000 | float64 | 0.040 | 0.070 | 1.75× (0.88-2.62) | 0.700 / 0.600 "
     "| **0.86×** |"),
])
def test_colab_markdown_rows(rounds, compile_line, step_line):
    md = kernel_speed.colab_markdown(_report(rounds))
    lines = md.splitlines()
    assert lines[0].startswith(f"Run of 2026-12-06 at 1a0d0614, {rounds} round")
    assert "JAX 0.10.2 (neural-tangents on JAX 0.4.30)" in lines[0]
    assert ("(rounds min-max)" in lines[2]) == (rounds > 1)
    assert lines[-2:] == [compile_line, step_line]


def test_colab_markdown_needs_neural_tangents_rows():
    report = _report()
    for r in report["colab_results"]:
        del r["nt"]
    with pytest.raises(ValueError, match="no neural-tangents rows"):
        kernel_speed.colab_markdown(report)


def test_throughput_markdown_rows():
    report = _report(rounds=2)
    report["results"] = [
        {"arch": "FC-3", "input": "28x28x1", "mode": "forward", "n1": 512, "n2": 512,
         "kipnb": {"pairs_per_s": 3.5e7}, "nt": {"pairs_per_s": 1.4e7},
         "ratio_kipnb_over_nt": 2.5, "ratio_kipnb_over_nt_min": 2.0,
         "ratio_kipnb_over_nt_max": 3.0, "max_rel_diff": 1.2e-6},
        {"arch": "ConvNet-3", "input": "28x28x1", "mode": "forward+grad", "n1": 8, "n2": 8,
         "kipnb": {"pairs_per_s": 4.0}, "nt": {"pairs_per_s": 5.0},
         "ratio_kipnb_over_nt": 0.8, "ratio_kipnb_over_nt_min": 0.7,
         "ratio_kipnb_over_nt_max": 0.9, "max_rel_diff": 1e-7, "grad_max_rel_diff": 3e-7},
    ]
    lines = kernel_speed.throughput_markdown(report).splitlines()
    assert lines[2] == ("| FC-3 | 28x28x1 | forward | 512 × 512 | 35.00M / 14.00M | "
                        "2.50× (2.00-3.00) | 1.2e-06 |")
    # slower rows in bold; the gradient's difference counts
    assert lines[3] == ("| ConvNet-3 | 28x28x1 | forward+grad | 8 × 8 | 4 / 5 | "
                        "**0.80×** (0.70-0.90) | 3.0e-07 |")
