# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Seed statistics of the benchmarks (convergence.py, convergence_t2i.py, evidence.py).

Spread: the sample standard deviation over seeds (ddof = 1); a single seed has none (None, shown as "1 seed").

Verdicts: Welch's unequal-variance t-test, two-sided, at 95 %. For the per-seed values b (the row expected to be
better: lower FID) and w (the row expected to be worse), with means m, sample variances s^2 and counts n:
    d  = m_w - m_b                                   (> 0: the expected order)
    se = sqrt(s_w^2 / n_w + s_b^2 / n_b),  t = d / se
    df = se^4 / ((s_w^2 / n_w)^2 / (n_w - 1) + (s_b^2 / n_b)^2 / (n_b - 1))      (Welch-Satterthwaite)
    p  = 2 P(T_df > |t|),  95 % interval of d: d +- t_{df, 0.975} se
(scipy.stats.ttest_ind(w, b, equal_var=False) and its confidence_interval). "holds": d > 0 and p < 0.05;
"reversed": d < 0 and p < 0.05; otherwise "not significant (p=...)"; "undetermined (1 seed)" with fewer than 2 seeds
on either side. With 2-3 seeds a side the test has little power: "not significant" means "not shown", not "equal".
"""

import numpy as np

ALPHA = 0.05
TEST = ("Welch's two-sided t-test on the per-seed values at 95 % (scipy.stats.ttest_ind, equal_var=False): "
        "holds if worse - better > 0 with p < 0.05, reversed if < 0 with p < 0.05, otherwise not significant")


def mean_std(values):
    """(mean, sample std with ddof 1); the std is None for a single value."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def fmt(mean, std, digits=2):
    """'mean ± std', or 'mean (1 seed)' where there is no spread."""
    return f"{mean:.{digits}f} (1 seed)" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare(better_values, worse_values, alpha=ALPHA):
    """Welch's t-test of worse - better (lower is better): {difference, p_value, ci_low, ci_high, t, df, n_better,
    n_worse, verdict}. Without two values a side only the difference (p, interval None)."""
    from scipy import stats

    b, w = np.asarray(better_values, dtype=float), np.asarray(worse_values, dtype=float)
    out = {"difference": float(w.mean() - b.mean()), "p_value": None, "ci_low": None, "ci_high": None, "t": None,
           "df": None, "n_better": len(b), "n_worse": len(w)}
    if min(len(b), len(w)) < 2:
        return dict(out, verdict="undetermined (1 seed)")
    if w.var(ddof=1) + b.var(ddof=1) == 0:  # no spread on either side: the difference is exact
        p, low, high = (1.0 if out["difference"] == 0 else 0.0), out["difference"], out["difference"]
    else:
        res = stats.ttest_ind(w, b, equal_var=False)
        ci = res.confidence_interval(1 - alpha)
        p, low, high = float(res.pvalue), float(ci.low), float(ci.high)
        out.update(t=float(res.statistic), df=float(res.df))
    out.update(p_value=p, ci_low=low, ci_high=high)
    if p < alpha and out["difference"] != 0:
        word = "holds" if out["difference"] > 0 else "reversed"
    else:
        word = f"not significant (p={p:.2g})"
    return dict(out, verdict=word)


def fmt_test(c):
    """'difference [95 % CI low, high], p=...' of a compare() result (the difference alone with 1 seed)."""
    if c["p_value"] is None:
        return f"{c['difference']:+.2f} (1 seed)"
    return f"{c['difference']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}], p={c['p_value']:.2g}"
