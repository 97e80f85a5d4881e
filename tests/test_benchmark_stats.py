"""benchmarks/stats.py (sample std, Welch's t-test and its verdicts) and the re-derivation of the committed benchmark
results from their per-seed FIDs (`--rederive`: nothing trained, no measured number changed)."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_loader import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
S = load_script(ROOT / "benchmarks" / "stats.py")


def test_mean_std_is_the_sample_std_and_one_seed_has_none():
    mean, std = S.mean_std([1.0, 2.0, 4.0])
    # by hand: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, divided by n - 1 = 2
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(7 / 3))
    assert std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1)) and std != pytest.approx(np.std([1.0, 2.0, 4.0]))
    assert S.mean_std([3.5]) == (3.5, None)
    assert S.fmt(3.5, None) == "3.50 (1 seed)" and S.fmt(7 / 3, math.sqrt(7 / 3)) == "2.33 ± 1.53"


def test_welch_against_the_formula_by_hand():
    better, worse = [1.0, 2.0, 3.0], [4.0, 5.0, 7.0]
    c = S.compare(better, worse)
    # means 2 and 16/3, sample variances 1 and 7/3: se^2 = 1/3 + 7/9 = 10/9, d = 10/3, t = d / se = sqrt(10),
    # Welch-Satterthwaite df = (10/9)^2 / ((7/9)^2 / 2 + (1/3)^2 / 2) = 200/58
    assert c["difference"] == pytest.approx(10 / 3)
    assert c["t"] == pytest.approx(math.sqrt(10)) and c["df"] == pytest.approx(200 / 58)
    se, df = math.sqrt(10 / 9), 200 / 58
    assert c["p_value"] == pytest.approx(2 * scipy_stats.t.sf(math.sqrt(10), df))
    assert c["p_value"] == pytest.approx(0.0419145, abs=1e-6)
    half = scipy_stats.t.ppf(0.975, df) * se
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(10 / 3 - half), pytest.approx(10 / 3 + half))
    assert c["ci_low"] > 0 and c["verdict"] == "holds" and (c["n_better"], c["n_worse"]) == (3, 3)
    # the same rows the other way round: the same p, the opposite difference and interval
    r = S.compare(worse, better)
    assert r["verdict"] == "reversed" and r["p_value"] == pytest.approx(c["p_value"])
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(-c["ci_high"]), pytest.approx(-c["ci_low"]))


def test_verdicts_not_significant_one_seed_and_no_spread():
    # 2 seeds a side, variances 1/2: se^2 = 1/4 + 1/4, t = 0.5 / sqrt(1/2) = 1 / sqrt(2), df = 2; Student's t with
    # 2 df has P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, so p = 1 - 1 / sqrt(5)
    c = S.compare([1.0, 2.0], [1.5, 2.5])
    assert c["df"] == pytest.approx(2.0) and c["t"] == pytest.approx(1 / math.sqrt(2))
    assert c["p_value"] == pytest.approx(1 - 1 / math.sqrt(5))
    assert c["verdict"] == "not significant (p=0.55)"
    assert c["ci_low"] < 0 < c["ci_high"]
    one = S.compare([1.0], [2.0, 3.0])
    assert one["verdict"] == "undetermined (1 seed)" and one["difference"] == pytest.approx(1.5)
    assert one["p_value"] is None and S.fmt_test(one) == "+1.50 (1 seed)"
    exact = S.compare([2.0, 2.0], [3.0, 3.0])  # no spread on either side: the difference is exact
    assert (exact["verdict"], exact["p_value"], exact["ci_low"], exact["ci_high"]) == ("holds", 0.0, 1.0, 1.0)
    assert S.compare([2.0, 2.0], [2.0, 2.0])["verdict"] == "not significant (p=1)"


def seeds_fids(curves, view, step):
    return [p["fid"] for seed in sorted(curves[view], key=int) for p in curves[view][seed] if p["step"] == step]


@pytest.fixture(scope="module")
def evidence_rederived(tmp_path_factory):
    evidence = load_script(ROOT / "benchmarks" / "evidence.py", "evidence_for_stats")
    out = tmp_path_factory.mktemp("evidence")
    for name in ("results.json", "loss_curves.json"):
        shutil.copy(RESULTS / "evidence" / name, out / name)
    evidence.plot = lambda *args, **kwargs: None  # the figures are not what is tested here (and take seconds)
    evidence.main(["--rederive", str(out)])
    return out


def test_rederived_evidence_keeps_the_measurements_and_uses_sample_std_and_welch(evidence_rederived):
    committed = json.loads((RESULTS / "evidence" / "results.json").read_text())
    new = json.loads((evidence_rederived / "results.json").read_text())
    # what was measured is unchanged: every per-seed point, the losses, the loss curves, the runs
    for key in ("settings", "flops_per_image", "vae", "loss_match", "curves", "losses", "runs_finished",
                "runs_merged", "machine"):
        assert new[key] == committed[key], key
    assert (evidence_rederived / "loss_curves.json").read_text() == (RESULTS / "evidence" / "loss_curves.json"
                                                                     ).read_text()
    # the summary's spread is the sample std of the seeds' FIDs
    for view, rows in new["summary"].items():
        for r in rows:
            fids = seeds_fids(new["curves"], view, r["step"])
            assert r["seeds"] == len(fids) >= 2
            assert r["fid_mean"] == pytest.approx(np.mean(fids)) and r["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    # every trend is Welch's test on the seeds' FIDs at its step
    for t in new["trends"]:
        for key in ("mid", "end"):
            test = t[key]
            b, w = seeds_fids(new["curves"], t["better"], test["step"]), seeds_fids(new["curves"], t["worse"],
                                                                                     test["step"])
            ref = scipy_stats.ttest_ind(w, b, equal_var=False)
            assert test["p_value"] == pytest.approx(ref.pvalue)
            assert test["fid_difference"] == pytest.approx(np.mean(w) - np.mean(b))
            assert test["ci95"][0] < test["fid_difference"] < test["ci95"][1]
    first = new["trends"][0]  # Self-Transcendence vs vanilla: behind at mid-run (p 0.027), tied at the end
    assert (first["mid"]["step"], first["mid"]["verdict"]) == (1500, "reversed")
    assert first["mid"]["fid_difference"] == pytest.approx(-2.284, abs=1e-3)
    assert first["mid"]["p_value"] == pytest.approx(0.027, abs=1e-3)
    assert first["end"]["verdict"].startswith("not significant (p=0.57")
    assert new["convergence"]["verdict"] == "flat" and new["convergence"]["test"]["p_value"] == pytest.approx(
        0.359, abs=1e-3)
    assert new["equal_compute"]["verdict"].endswith("not significant (p=0.39)")
    assert "pooled" not in json.dumps(new) and "pooled" not in (evidence_rederived / "results.md").read_text()
    # the committed files are what the re-derivation writes
    assert new == committed
    assert (evidence_rederived / "results.md").read_text() == (RESULTS / "evidence" / "results.md").read_text()


@pytest.mark.parametrize("folder", ["convergence", "convergence-400steps", "convergence_t2i"])
def test_rederived_convergence_keeps_the_curves_and_uses_sample_std_and_welch(folder, tmp_path):
    convergence = load_script(ROOT / "benchmarks" / "convergence.py", "convergence_for_stats")
    shutil.copy(RESULTS / folder / "curves.json", tmp_path / "curves.json")
    convergence.main(["--rederive", str(tmp_path)])
    committed = json.loads((RESULTS / folder / "curves.json").read_text())
    new = json.loads((tmp_path / "curves.json").read_text())
    for key in ("settings", "curves", "benchmark_seconds", "machine"):
        assert new[key] == committed[key], key
    for method, rows in new["summary"].items():
        for r in rows:
            fids = seeds_fids(new["curves"], method, r["step"])
            assert r["seeds"] == len(fids) == 3
            assert r["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    for c in new["comparisons"]:
        b, w = (seeds_fids(new["curves"], c[k], c["step"]) for k in ("better", "worse"))
        assert c["p_value"] == pytest.approx(scipy_stats.ttest_ind(w, b, equal_var=False).pvalue)
    assert new == committed
    assert (tmp_path / "results.md").read_text() == (RESULTS / folder / "results.md").read_text()
    if folder == "convergence":  # Self-Transcendence ahead of vanilla at 600 steps: +36.3 FID, p 0.0072
        last = next(c for c in new["comparisons"] if (c["better"], c["worse"], c["step"]) == (
            "self_transcendence", "vanilla", 600))
        assert last["verdict"] == "holds" and last["difference"] == pytest.approx(36.31, abs=0.01)
        assert last["p_value"] == pytest.approx(0.0072, abs=1e-4)
