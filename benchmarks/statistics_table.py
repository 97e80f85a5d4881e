#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Write benchmarks/results/STATISTICS.md: every verdict of the committed benchmark results under the old rule (a mean
difference larger than the pooled std, sqrt((s_a^2 + s_b^2) / 2), of the std each file recorded then: ddof 0 in the
convergence benchmarks, ddof 1 in the evidence benchmark) and under Welch's t-test (benchmarks/stats.py).

The old rule is read from the result files as committed at BEFORE (`git show`), the new test computed on the same
per-seed FIDs (which the re-derivation did not change). Verdicts: the evidence benchmark's trends, equal compute and
convergence check as it recorded them, and the comparisons README.md states from the convergence, text-to-image and
evidence results.

    python benchmarks/statistics_table.py        # needs the git history (BEFORE)
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import stats as S  # noqa: E402

BEFORE = "b9bbf91"  # the last commit with the old statistics
RESULTS = "benchmarks/results"
# README statements beyond the evidence trends: (folder, better, worse, steps, what README says)
README_CLAIMS = [
    *(("convergence", "self_transcendence", m, (450, 600), "Self-Transcendence ahead of every baseline from step "
       "450 on, beyond the spread") for m in ("vae_align", "layersync", "vanilla", "sra", "dispersive")),
    *(("convergence-400steps", a, b, (400,), "at 400 steps all methods but dispersive inside one another's spread")
      for i, a in enumerate(("vae_align", "layersync", "self_transcendence", "vanilla"))
      for b in ("vae_align", "layersync", "self_transcendence", "vanilla", "sra")[i + 1:]),
    *((folder, b, w, steps, "before ~400 steps no difference resolved (dispersive aside)")
      for folder, steps in (("convergence", (150, 300)), ("convergence-400steps", (100, 200, 300)))
      for b, w in [("self_transcendence", m) for m in ("vanilla", "vae_align", "sra", "layersync")]
      + [(m, "vanilla") for m in ("vae_align", "sra", "layersync")]),
    ("convergence_t2i", "self_transcendence", "vanilla", (600,), "ahead of vanilla at 600 steps beyond the spread"),
    ("convergence_t2i", "self_transcendence", "vanilla", (150, 300, 450), "at 450 inside about two stds, before that "
     "no difference resolved"),
    ("evidence", "self_transcendence", "vanilla", (375,), "ahead only at the first evaluation"),
    ("evidence", "self_transcendence", "vanilla", (750, 1125, 1875), "behind vanilla beyond the spread from 750 to "
     "1,875 steps (1,500 and 3,000: the trend)"),
    ("evidence", "vae_align", "vanilla", (375, 750, 1125, 1875, 2250, 2625), "VAE-align within vanilla's spread at "
     "every evaluation (1,500 and 3,000: the trend)"),
    ("evidence", "w1_loss_matched", "vanilla", (375, 750), "loss-matched w = 1 leads vanilla at 375 and 750 beyond "
     "the spread"),
    ("evidence", "w1_loss_matched", "self_transcendence", (750,), "loss-matched w = 1 ahead of w = 30 beyond the "
     "spread at 750 (1,500 and 3,000: the trend)"),
    ("evidence", "self_transcendence_rerun", "teacher_150", (1500,), "100 % teacher ahead of 150 % at 1,500"),
    ("evidence", "layers_8-4", "self_transcendence", (1500, 3000), "8 -> 4 ahead of the full row at 1,500 and 3,000"),
    ("evidence", "self_transcendence_rerun", "lambda_1.0", (375, 750), "lambda 1.0 within the control's spread at "
     "every point (1,500 and 3,000: the trend)"),
    ("evidence", "lambda_0.1", "lambda_1.0", (1500,), "lambda 1.0 behind lambda 0.1 by 1.6 at 1,500"),
]


def git_json(path):
    return json.loads(subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=ROOT, check=True, capture_output=True,
                                     text=True).stdout)


def old_rule(b, w):
    """The rule before: worse - better against the pooled std of the recorded stds."""
    diff = w["fid_mean"] - b["fid_mean"]
    spread = math.sqrt((b["fid_std"] ** 2 + w["fid_std"] ** 2) / 2)
    return diff, spread, "holds" if diff > spread else "reversed" if -diff > spread else "within spread"


def category(word):
    """holds / reversed / not significant (the old "within spread"), without the p-value."""
    return word.split(" (")[0].replace("within spread", "not significant")


def fids_at(saved, view, step):
    curves = saved["curves"][view]
    return [p["fid"] for seed in sorted(curves, key=int) for p in curves[seed] if p["step"] == step]


def table_row(source, what, rows, step, old, new, new_word=None):
    """A markdown row and whether the verdict changed. old: (difference, spread, word) by the old rule; new: a
    stats.compare result (new_word overrides its verdict)."""
    new_word = new_word or category(new["verdict"])
    changed = category(old[2]) != new_word
    return (f"| {source} | {what} | {rows} | {step} | {old[0]} | {old[1]} | {old[2]} | "
            f"[{new['ci_low']:+.2f}, {new['ci_high']:+.2f}] | {new['p_value']:.2g} | {new_word} | "
            f"{'**changed**' if changed else ''} |"), changed


def main():
    files = {"evidence": f"{RESULTS}/evidence/results.json"}
    files.update({f: f"{RESULTS}/{f}/curves.json" for f in ("convergence", "convergence-400steps", "convergence_t2i")})
    before = {name: git_json(path) for name, path in files.items()}
    at = {name: {m: {r["step"]: r for r in rows} for m, rows in saved["summary"].items()}
          for name, saved in before.items()}
    rows = []
    ev = before["evidence"]
    # the evidence benchmark's recorded verdicts
    for t in ev["trends"]:
        for key in ("mid", "end"):
            old, step = t[key], t[key]["step"]
            new = S.compare(fids_at(ev, t["better"], step), fids_at(ev, t["worse"], step))
            rows.append(table_row("evidence trend", t["trend"], f"{t['better']} vs {t['worse']}", step,
                                  (f"{old['fid_difference']:+.2f}", f"{old['pooled_std']:.2f}", old["verdict"]), new))
    eq = ev["equal_compute"]
    new = S.compare(fids_at(ev, "self_transcendence", 3000), fids_at(ev, "vanilla_charged", 4500))
    rows.append(table_row("evidence equal compute", "ST (teacher charged) vs vanilla at steps + stage 1",
                          "self_transcendence vs vanilla_charged", "3000 / 4500",
                          (f"{eq['fid_difference']:+.2f}", f"{eq['pooled_std']:.2f}", eq["verdict"].rsplit(": ")[-1]),
                          new))
    conv = ev["convergence"]
    first, last = conv["from_step"], conv["to_step"]
    new = S.compare(fids_at(ev, "vanilla", last), fids_at(ev, "vanilla", first))
    rows.append(table_row("evidence convergence", "vanilla's last 20 % flat (now: no significant change)",
                          f"vanilla at {first} and {last}", f"{first}-{last}",
                          (f"{conv['fid_change']:.2f} (change)", f"{conv['seed_std']:.2f} (mean std)", conv["verdict"]),
                          new, "flat" if new["p_value"] >= S.ALPHA else "still changing"))
    # what README.md states from the results, the old rule applied to the stds recorded then
    for source, b, w, steps, what in README_CLAIMS:
        for step in steps:
            diff, spread, word = old_rule(at[source][b][step], at[source][w][step])
            new = S.compare(fids_at(before[source], b, step), fids_at(before[source], w, step))
            rows.append(table_row(source, f"README: {what}", f"{b} vs {w}", step, (f"{diff:+.2f}", f"{spread:.2f}",
                                                                                   word), new))
    changed = [text for text, flag in rows if flag]
    head = ["| results | verdict | rows (better vs worse) | step | difference | pooled std (before) | before | "
            "95 % CI (now) | p (now) | now | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    text = ["# Statistics of the benchmark verdicts (issue 29, item 3)", "",
            f"**Test now** (benchmarks/stats.py): {S.TEST}. The spread is the sample std over seeds (ddof 1) in "
            "every benchmark. With 2-3 seeds a side the test has little power: \"not significant\" means no "
            "difference was shown, not that there is none.", "",
            f"**Rule before** (the files as committed at {BEFORE}): a verdict held when the mean FID difference "
            "exceeded the pooled std sqrt((s_a^2 + s_b^2) / 2), about one standard error with 2-3 seeds; the "
            "convergence benchmarks recorded a population std (ddof 0), the evidence benchmark a sample std. "
            "\"within spread\" is the old word for \"not significant\".", "",
            "Every result file was re-derived from its committed per-seed FIDs, no run retrained and no measured "
            "number changed (`python benchmarks/<benchmark>.py --rederive benchmarks/results/<folder>`); this table "
            "is written by `python benchmarks/statistics_table.py`. Difference: mean FID of the second row - the "
            "first (> 0: the first is better); 95 % CI and p: Welch. Rows marked \"README:\" are comparisons "
            "README.md states in words; \"before\" applies the old rule to them, which README's wording did not "
            "always follow (it called the 400-step differences \"inside one another's spread\" where the rule "
            "counted three of them beyond it).", "",
            f"## The {len(changed)} verdicts that changed (of {len(rows)})", "", *head, *changed, "",
            "## Every verdict", "", *head, *(t for t, _ in rows)]
    (ROOT / RESULTS / "STATISTICS.md").write_text("\n".join(text) + "\n")
    print("\n".join(changed))


if __name__ == "__main__":
    main()
