"""Statistics over snippets grouped by token: per-token means, macro means over tokens, and a two-level bootstrap
(tokens, then each token's snippets) whose draws depend only on the layout and the seed, so paired."""

from __future__ import annotations

import numpy as np


def group_mean(x: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """[n, ...] the mean of the rows of `x` in each of `n` groups (`group`: each row's), NaN for an empty group."""
    sums = np.zeros((n, *x.shape[1:]))
    np.add.at(sums, group, x)
    counts = np.bincount(group, minlength=n).reshape(n, *[1] * (x.ndim - 1))
    with np.errstate(invalid="ignore"):
        return sums / counts


def bootstrap(values: np.ndarray, group: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot] resampled macro means: tokens drawn with replacement, then each drawn token's snippets. The
    draws depend only on the group sizes and the seed, so equal layouts give paired resamples."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(group == g) for g in np.unique(group)]
    inner = np.empty((len(groups), n_boot))
    for k, idx in enumerate(groups):
        draw = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        inner[k] = values[idx][draw].mean(1)
    outer = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    return inner[outer, np.arange(n_boot)[:, None]].mean(1)


def macro_mean(values: np.ndarray, group: np.ndarray) -> float:
    """Mean over groups of the per-group means (each token weighs the same however many snippets it has)."""
    return float(np.mean([values[group == g].mean() for g in np.unique(group)]))


def interval(draws: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap draws."""
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def summarize(values: dict[str, np.ndarray], group: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """{metric: {"mean", "ci95": [lo, hi]}} with bootstrap percentile intervals."""
    out = {}
    for name, v in values.items():
        out[name] = {"mean": macro_mean(v, group), "ci95": interval(bootstrap(v, group, n_boot, seed))}
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, group: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Macro mean of a - b with a paired bootstrap interval (same resamples for both)."""
    draws = bootstrap(a, group, n_boot, seed) - bootstrap(b, group, n_boot, seed)
    return {"mean": macro_mean(a, group) - macro_mean(b, group), "ci95": interval(draws)}


def paired_ratio(a: np.ndarray, b: np.ndarray, group: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Macro mean of a over macro mean of b with a paired bootstrap interval: the quality tables' ratio and how far
    the held-out sample alone could move it."""
    draws = bootstrap(a, group, n_boot, seed) / bootstrap(b, group, n_boot, seed)
    return {"mean": macro_mean(a, group) / macro_mean(b, group), "ci95": interval(draws)}


def per_token(values: dict[str, np.ndarray], group: np.ndarray, n_tokens: int) -> list[dict[str, float | None]]:
    """Per-token means of every metric (None for tokens without snippets)."""
    has = np.bincount(group, minlength=n_tokens) > 0
    means = {k: group_mean(v, group, n_tokens) for k, v in values.items()}
    return [{k: (float(means[k][t]) if has[t] else None) for k in values} for t in range(n_tokens)]
