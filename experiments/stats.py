"""Statistics of the reproduction (math / numpy only): exact McNemar, the unpaired z-test, the paired
bootstrap CI, mean ± sample sd, the power of the paired test (smallest detectable Δ), and the seed-level view:
Student's t (its CDF through the regularized incomplete beta), the paired t-test over seeds and a bootstrap over
seeds and test examples together."""
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


def regularized_incomplete_beta(x, a, b):
    """I_x(a, b) = B(x; a, b) / B(a, b), by Lentz's continued fraction (Numerical Recipes §6.4), using the
    symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly (x > (a + 1) / (a + b + 2))."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta: x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),                 # the even step d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):    # the odd step d_{2m+1}
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * frac / a


def t_two_sided_p(t, df):
    """Two-sided p of Student's t with df degrees of freedom: P(|T| ≥ |t|) = I_{df/(df+t²)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def paired_t_test(deltas):
    """The paired t-test whose unit is the seed: deltas = one (treated − control) Δ per seed pair.
    t = mean / (sd / √n), df = n − 1. -> {"n", "mean", "sd", "t", "df", "p"}; None with fewer than 2 pairs.
    All deltas equal (sd 0): p = 0 unless they are all 0 (p = 1)."""
    deltas = [float(d) for d in deltas]
    n = len(deltas)
    if n < 2:
        return None
    mean, sd = mean_sd(deltas)
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return {"n": n, "mean": mean, "sd": sd, "t": t, "df": n - 1, "p": 1.0 if mean == 0.0 else 0.0}
    t = mean / (sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "t": t, "df": n - 1, "p": t_two_sided_p(t, n - 1)}


def seed_bootstrap_ci(diffs_by_seed, n_boot=N_BOOT, seed=BOOT_SEED, level=0.95):
    """Two-level bootstrap over seeds and test examples together: diffs_by_seed = one list per seed pair of
    per-task arrays of per-example (treated − control) correctness. Each replicate draws the seed pairs with
    replacement, then, independently for each drawn slot, the test examples within each task (paired, as in
    paired_bootstrap_ci); its statistic is the mean over the drawn slots of the Δ of the task-averaged
    accuracy. With 3 seeds only 10 seed multisets exist, so the interval is coarse. -> (lo, hi), proportions."""
    rng = np.random.default_rng(seed)
    k = len(diffs_by_seed)
    if k == 0:
        raise ValueError("seed_bootstrap_ci: no seed pairs")
    per_slot = np.zeros((k, k, n_boot))            # [seed, slot, replicate]: that seed's resampled Δ
    for s, diffs in enumerate(diffs_by_seed):
        for d in diffs:
            d = np.asarray(d, dtype=np.float64)
            levels, counts = np.unique(d, return_counts=True)
            draws = rng.multinomial(len(d), counts / len(d), size=(k, n_boot))
            per_slot[s] += draws @ levels / len(d) / len(diffs)
    picks = rng.integers(0, k, size=(k, n_boot))   # which seed fills each slot of each replicate
    stats = per_slot[picks, np.arange(k)[:, None], np.arange(n_boot)[None, :]].mean(axis=0)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)
