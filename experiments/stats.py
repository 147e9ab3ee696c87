"""Statistics of the reproduction (math / numpy only): exact McNemar, the unpaired z-test, the paired
bootstrap CI, mean ± sample sd, and the power of the paired test (smallest detectable Δ)."""
import math
from statistics import NormalDist

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0


def binom_half_cdf(k, n):
    """P(X <= k) for X ~ Binomial(n, 1/2), exact: sum of C(n, i) for i <= k over 2^n in integers (Python's
    int / int division rounds correctly; underflows to 0.0 only below ~1e-308)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    term, total = 1, 1                       # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)     # C(n, i + 1), exact
        total += term
    return total / (1 << n)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar test: b, c = discordant pair counts (treated right only, control right
    only). Under H0 each discordant pair goes either way with probability 1/2, so
    p = min(1, 2 · P(X <= min(b, c))), X ~ Binomial(b + c, 1/2). No discordant pairs: p = 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_half_cdf(min(b, c), n))


def two_proportion_z(c1, n1, c2, n2):
    """UNPAIRED two-sided z-test of p1 = p2 (pooled variance) -> (z, p)."""
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    p1, p2, pool = c1 / n1, c2 / n2, (c1 + c2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def paired_bootstrap_ci(diffs, n_boot=N_BOOT, seed=BOOT_SEED, level=0.95):
    """diffs: one array per task of per-example (treated − control) correctness, averaged over the common
    seeds. Statistic: the mean over tasks of each task's mean difference (= the delta of the task-averaged
    accuracy). Test examples are resampled with replacement within each task, the same draw for both
    methods (paired). A task's values take few distinct levels, so resampling n examples is drawing
    multinomial counts over those levels — the same distribution, cheap. -> (lo, hi), fixed seed."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot)
    for d in diffs:
        d = np.asarray(d, dtype=np.float64)
        levels, counts = np.unique(d, return_counts=True)
        draws = rng.multinomial(len(d), counts / len(d), size=n_boot)
        stats += draws @ levels / len(d)
    stats /= len(diffs)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mean_sd(values):
    """-> (mean, sample sd or None with fewer than 2 values); (None, None) for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mcnemar_pairs_needed(delta, discordance, alpha=0.05, power=0.8):
    """Pairs the paired (McNemar) test needs to detect a difference `delta` in accuracy (a proportion)
    when a share `discordance` of the pairs is discordant (Connor 1987, normal approximation):
    n = (z_{1-α/2} √ψ + z_{power} √(ψ − δ²))² / δ²."""
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    return (z_a * math.sqrt(discordance) + z_b * math.sqrt(max(discordance - delta ** 2, 0.0))) ** 2 / delta ** 2


def min_detectable_delta(pairs, discordance, alpha=0.05, power=0.8):
    """The smallest |Δ| (a proportion) that the paired test detects with `power` at two-sided `alpha` over
    `pairs` pairs with discordance share ψ: the root of mcnemar_pairs_needed(Δ) = pairs (bisection;
    Δ ≤ ψ always). None without pairs or discordance."""
    if not pairs or not discordance:
        return None
    lo, hi = 1e-9, discordance
    if mcnemar_pairs_needed(hi, discordance, alpha, power) > pairs:
        return None                                  # not even Δ = ψ is detectable
    for _ in range(200):
        mid = (lo + hi) / 2
        if mcnemar_pairs_needed(mid, discordance, alpha, power) > pairs:
            lo = mid
        else:
            hi = mid
    return hi
