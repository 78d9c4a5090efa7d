"""Maximum mean discrepancy with a permutation p-value, for embeddings.

Name: ``mmd``. Embedding (vector) features, numeric ones too (as 1-d vectors).
Gaussian kernel with the median-distance bandwidth of the pooled sample; the
statistic is the (biased, V-statistic) squared MMD and the p-value comes from
``N_PERMUTATIONS`` seeded label permutations, so it is exact in finite samples
and reproducible. Each side is subsampled to ``MAX_SAMPLES`` to bound the
kernel matrix (cost ~ N_PERMUTATIONS * (2 * MAX_SAMPLES)^2). Drift when the
p-value is below the threshold (default 0.05).

Hand-written (numpy) rather than alibi-detect: that library is BSL-licensed
now and pulls TensorFlow or torch; the test is thirty lines.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> mmd_test.run(rng.normal(size=(200, 8)), rng.normal(0.5, 1, (200, 8)), "emb").drifted
    True
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests.base import StatTest, register_stattest

N_PERMUTATIONS = 200
MAX_SAMPLES = 300
SEED = 0


def mmd_stat(reference: np.ndarray, current: np.ndarray, feature_type: str) -> tuple[float, float]:
    """Squared MMD and its permutation p-value (``N_PERMUTATIONS`` permutations)."""
    return mmd_pvalue(reference, current)


def mmd_pvalue(
    reference: np.ndarray, current: np.ndarray, n_permutations: int = N_PERMUTATIONS
) -> tuple[float, float]:
    """Squared MMD and its p-value from ``n_permutations`` seeded permutations.

    The smallest p-value it can return is ``1 / (n_permutations + 1)``: an online
    monitor testing at a small alpha asks for more permutations.
    """
    rng = np.random.default_rng(SEED)
    x, y = _cap(reference, rng), _cap(current, rng)
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    z = np.concatenate([x, y])
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    off = d2[np.triu_indices(len(z), k=1)]
    bandwidth = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / bandwidth)
    n, m = len(x), len(y)
    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    weights = np.stack([base] + [rng.permutation(base) for _ in range(n_permutations)])
    stats = np.sum((weights @ k) * weights, axis=1)  # a^T K a for every weighting
    observed = float(stats[0])
    p = (1.0 + np.sum(stats[1:] >= observed - 1e-12)) / (1.0 + n_permutations)
    return observed, float(p)


def _cap(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return a if len(a) <= MAX_SAMPLES else a[rng.choice(len(a), MAX_SAMPLES, replace=False)]


mmd_test = register_stattest(
    StatTest(
        name="mmd",
        display_name="MMD permutation p-value",
        func=mmd_stat,
        feature_types=("emb", "num"),
        default_threshold=0.05,
        threshold_kind="p_value",
    )
)
