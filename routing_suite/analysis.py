"""Pure functions over activation arrays: no model, no I/O.

Shapes use n = prompt pairs, d = hidden size, r = rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating]


def paired_differences(h_eval: Array, h_deploy: Array) -> Array:
    """(n, d) per-pair differences h(deploy) - h(eval)."""
    if h_eval.shape != h_deploy.shape:
        raise ValueError(f"paired arrays differ in shape: {h_eval.shape} vs {h_deploy.shape}")
    return h_deploy - h_eval


def diff_of_means(h_eval: Array, h_deploy: Array) -> Array:
    """(d,) mean over pairs of h(deploy) - h(eval)."""
    return paired_differences(h_eval, h_deploy).mean(axis=0)


def subspace(differences: Array, rank: int) -> Array:
    """(rank, d) orthonormal rows spanning the main directions of the paired differences.

    The SVD is of the uncentred differences, so the first row is (up to sign)
    the direction that best explains the mean shift; the sign is fixed so
    that the mean difference projects positively on every row.
    """
    n, d = differences.shape
    if rank < 1 or rank > min(n, d):
        raise ValueError(f"rank {rank} must be in [1, {min(n, d)}] (pairs: {n}, hidden: {d})")
    _, _, vt = np.linalg.svd(differences.astype(np.float64), full_matrices=False)
    basis = vt[:rank]
    signs = np.sign(basis @ differences.mean(axis=0))
    signs[signs == 0] = 1
    return (basis * signs[:, None]).astype(np.float32)


def rank_one_probe_accuracy(direction: Array, fit_eval: Array, fit_deploy: Array, test_eval: Array, test_deploy: Array) -> float:
    """Held-out accuracy of eval vs deploy from the projection on one direction.

    The threshold is the midpoint of the two class means on the fit split.
    """
    norm = np.linalg.norm(direction)
    if norm == 0:
        return 0.5
    unit = direction / norm
    threshold = 0.5 * ((fit_eval @ unit).mean() + (fit_deploy @ unit).mean())
    correct = np.concatenate([(test_eval @ unit) < threshold, (test_deploy @ unit) >= threshold])
    return float(correct.mean())


def cosine(a: Array, b: Array) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def cosine_matrix(vectors: Array) -> Array:
    """(k, k) pairwise cosines of k vectors (rows)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1, norms)
    return unit @ unit.T


def random_subspace(d: int, rank: int, rng: np.random.Generator, avoid: Array | None = None) -> Array:
    """(rank, d) orthonormal rows, uniformly random; with `avoid` (k, d)
    orthonormal rows, random within their orthogonal complement."""
    x = rng.standard_normal((d, rank))
    if avoid is not None:
        x = x - avoid.T @ (avoid @ x)
    q, _ = np.linalg.qr(x)
    return q.T.astype(np.float32)


def mean_change_norm(change: Array) -> float:
    return float(np.linalg.norm(change, axis=-1).mean())


# ---------------------------------------------------------------- unpaired classes (EM responses)


def mean_difference(negative: Array, positive: Array) -> Array:
    """(d,) mean(positive) - mean(negative) of two unpaired sets of rows."""
    if len(negative) == 0 or len(positive) == 0:
        raise ValueError(f"both classes need rows (got {len(negative)} and {len(positive)})")
    return positive.mean(axis=0) - negative.mean(axis=0)


def paired_mean_difference(negative: Array, positive: Array, negative_groups: Array, positive_groups: Array) -> tuple[Array, int]:
    """(d,) the mean over groups holding rows of both classes of mean(positive) - mean(negative)
    within the group, and the number of such groups. Pairing within a group (a prompt) keeps
    what differs between groups out of the difference: pooled means of sampled responses mix
    in which prompts happened to be answered each way (e.g. a fine-tune that lies more on one
    topic puts that topic's words into the direction)."""
    both = np.intersect1d(np.unique(negative_groups), np.unique(positive_groups))
    if len(both) == 0:
        raise ValueError("no group holds rows of both classes")
    diffs = [positive[positive_groups == g].mean(axis=0) - negative[negative_groups == g].mean(axis=0) for g in both]
    return np.mean(diffs, axis=0), len(both)


def separation_accuracy(direction: Array, fit_negative: Array, fit_positive: Array, test_negative: Array, test_positive: Array) -> float:
    """Balanced held-out accuracy of the two classes from the projection on one direction.

    The threshold is the midpoint of the fit classes' mean projections, as in
    `rank_one_probe_accuracy`; balanced (the mean of the two per-class
    accuracies) because sampled responses rarely come in equal numbers. NaN
    when a test class is empty or the direction is zero.
    """
    norm = np.linalg.norm(direction)
    if norm == 0 or len(test_negative) == 0 or len(test_positive) == 0:
        return float("nan")
    unit = direction / norm
    threshold = 0.5 * ((fit_negative @ unit).mean() + (fit_positive @ unit).mean())
    return float(0.5 * (((test_negative @ unit) < threshold).mean() + ((test_positive @ unit) >= threshold).mean()))


# ---------------------------------------------------------------- ridge maps between activation spaces


@dataclass(frozen=True)
class RidgeMap:
    """y ~ (x - x_mean) @ weight + y_mean: from a donor's space (d_x) to a receiver's (d_y)."""

    weight: Array  # (d_x, d_y)
    x_mean: Array  # (d_x,)
    y_mean: Array  # (d_y,)
    alpha: float

    def __call__(self, x: Array) -> Array:
        return (x - self.x_mean) @ self.weight + self.y_mean

    def carry(self, direction: Array) -> Array:
        """A difference of activations maps through the linear part only (the offsets cancel)."""
        return direction @ self.weight


def ridge_map(x: Array, y: Array, alpha: float) -> RidgeMap:
    """Ridge regression of y (n, d_y) on x (n, d_x), both centred. `alpha` is relative
    to the mean eigenvalue of the centred x^T x, so one value suits any scale."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"a ridge map needs (n, d) arrays with the same n >= 2 rows (got {x.shape} and {y.shape})")
    if alpha <= 0:
        raise ValueError(f"ridge alpha={alpha} must be > 0")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    xc, yc = x64 - x_mean, y64 - y_mean
    gram = xc.T @ xc
    penalty = alpha * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    weight = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ yc)
    return RidgeMap(weight.astype(np.float32), x_mean.astype(np.float32), y_mean.astype(np.float32), float(alpha))


def r_squared(prediction: Array, y: Array) -> float:
    """1 - SSE / SST over every output dimension (variance-weighted R^2); NaN if y is constant."""
    total = float(((y - y.mean(0)) ** 2).sum())
    return float(1 - ((y - prediction) ** 2).sum() / total) if total > 0 else float("nan")


def select_ridge(x: Array, y: Array, groups: Array, alphas: list[float], folds: int = 5) -> RidgeMap:
    """The ridge map with the penalty of best cross-validated R^2, refit on all rows.

    Folds are over `groups` (one id per row, e.g. the text a token belongs
    to), so that tokens of one text never sit on both sides of a fold.
    """
    if not alphas:
        raise ValueError("select_ridge needs at least one alpha")
    ids = np.unique(groups)
    if len(ids) < 2:
        raise ValueError(f"cross-validation needs rows from at least 2 groups (got {len(ids)})")
    fold_of = {g: i % min(folds, len(ids)) for i, g in enumerate(ids)}
    fold = np.array([fold_of[g] for g in groups])
    scores = []
    for alpha in alphas:
        sse = sst = 0.0
        for k in np.unique(fold):
            fit, val = fold != k, fold == k
            m = ridge_map(x[fit], y[fit], alpha)
            sse += float(((y[val] - m(x[val])) ** 2).sum())
            sst += float(((y[val] - y[fit].mean(0)) ** 2).sum())
        scores.append(1 - sse / sst if sst > 0 else -np.inf)
    return ridge_map(x, y, alphas[int(np.argmax(scores))])


def token_mean_r_squared(fit_ids: Array, y_fit: Array, test_ids: Array, y_test: Array) -> float:
    """Held-out R^2 of predicting y from the token alone: its mean y over the fit rows of
    that token id (the overall fit mean for a token never seen). A map must beat this to
    carry more than which word is there."""
    means = {t: y_fit[fit_ids == t].mean(0) for t in np.unique(fit_ids)}
    overall = y_fit.mean(0)
    prediction = np.stack([means.get(t, overall) for t in test_ids]) if len(test_ids) else y_test
    return r_squared(prediction, y_test)
