"""Sample-quality metrics for generative models, on host (numpy, float64): pure functions of arrays.

    sliced_wasserstein(x_nd, y_md)                 SW_2 between two point clouds
    sliced_wasserstein_per_class(...)              the same per class label
    own_class_fraction(x_n2, labels_n, means, component_class)   guidance metric of the 2-D mixture
    frechet_distance(feat_a_nf, feat_b_mf)         FD between Gaussians fitted to features (an FID analogue)
    precision_recall(real_nf, fake_mf, k=3)        Kynkaanniemi et al. 2019, k-NN manifolds
    within_class_diversity(feat_nf, labels_n)      mean pairwise feature distance within a class
    classifier_scores(probs_nk, labels_n)          accuracy and mean confidence on the requested classes

Every function reads numpy (or anything `np.asarray` takes) and returns Python floats / dicts.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
    return np.asarray(x, np.float64)


def _quantiles(sorted_n, levels):
    """Quantile function of an empirical distribution at `levels` in (0, 1), by linear interpolation."""
    n = sorted_n.shape[0]
    return np.stack([np.interp(levels, (np.arange(n) + 0.5) / n, col) for col in sorted_n.T], axis=1)


def sliced_wasserstein(x_nd, y_md, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance  SW_2 = sqrt(E_theta W_2^2(theta . x, theta . y)), theta uniform on
    the unit sphere (`num_projections` directions drawn from `seed`, the same for every call).

    One-dimensional W_2 is the L2 distance between quantile functions; with n != m samples both are
    evaluated at max(n, m) midpoint levels.  Returns 0 for identical clouds.
    """
    x, y = _f64(x_nd).reshape(len(x_nd), -1), _f64(y_md).reshape(len(y_md), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < 1 or len(y) < 1:
        raise ValueError("sliced_wasserstein needs non-empty samples")
    theta = np.random.default_rng(seed).standard_normal((x.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    if len(px) != len(py):
        levels = (np.arange(max(len(px), len(py))) + 0.5) / max(len(px), len(py))
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def sliced_wasserstein_per_class(x_nd, x_labels, y_md, y_labels, **kw) -> dict[int, float]:
    """{class: SW_2(x of that class, y of that class)} for every class present in x_labels."""
    x_labels, y_labels = np.asarray(x_labels), np.asarray(y_labels)
    out = {}
    for c in np.unique(x_labels):
        if not (y_labels == c).any():
            raise ValueError(f"class {c} has no reference samples")
        out[int(c)] = sliced_wasserstein(
            np.asarray(x_nd)[x_labels == c], np.asarray(y_md)[y_labels == c], **kw
        )
    return out


def own_class_fraction(x_n2, labels_n, *, means, component_class) -> float:
    """Fraction of samples whose nearest mixture-component mean belongs to the class they were drawn for."""
    d2 = ((_f64(x_n2)[:, None, :] - _f64(means)[None]) ** 2).sum(-1)
    nearest = np.asarray(component_class)[np.argmin(d2, axis=1)]
    return float(np.mean(nearest == np.asarray(labels_n)))


def _psd_sqrt(c):
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)  (Frechet distance of two Gaussians).

    Uses the symmetric form (eigendecompositions only), exact for PSD covariances; clipped at 0.
    """
    mu_a, mu_b, cov_a, cov_b = map(_f64, (mu_a, mu_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    cross = np.trace(_psd_sqrt(root_a @ cov_b @ root_a))
    return float(max(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0))


def frechet_distance(feat_a_nf, feat_b_mf) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets."""
    a, b = _f64(feat_a_nf), _f64(feat_b_mf)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [n, f] feature sets with n >= 2; got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _pairwise(a, b):
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def _knn_radii(a, k):
    d = _pairwise(a, a)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real_nf, fake_mf, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the point's
    k-th nearest neighbour in the same set.  precision = fraction of fake points inside the real manifold;
    recall = fraction of real points inside the fake manifold.
    """
    real, fake = _f64(real_nf), _f64(fake_mf)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"k={k} needs more than k points in each set; got {len(real)} and {len(fake)}")
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = _pairwise(fake, real)  # [m, n]
    precision = np.mean((d <= r_real[None, :]).any(axis=1))
    recall = np.mean((d <= r_fake[:, None]).any(axis=0))
    return {"precision": float(precision), "recall": float(recall)}


def within_class_diversity(feat_nf, labels_n) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between features of one class.

    Collapse (every sample of a class alike) gives 0; compare with the real data's value.
    """
    feat, labels = _f64(feat_nf), np.asarray(labels_n)
    per_class = []
    for c in np.unique(labels):
        f = feat[labels == c]
        if len(f) < 2:
            continue
        d = _pairwise(f, f)
        per_class.append(d.sum() / (len(f) * (len(f) - 1)))
    if not per_class:
        raise ValueError("within_class_diversity needs a class with at least 2 samples")
    return float(np.mean(per_class))


def classifier_scores(probs_nk, labels_n) -> dict[str, float]:
    """accuracy = mean[argmax p == requested class]; confidence = mean p(requested class | sample)."""
    probs, labels = _f64(probs_nk), np.asarray(labels_n)
    return {
        "accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
        "confidence": float(np.mean(probs[np.arange(len(labels)), labels])),
    }
