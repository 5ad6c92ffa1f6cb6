"""Demo and benchmark datasets, built offline, and the non-IID splits that turn them into domains.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 rows, 64 features), no download.
* ``mnist1d``: MNIST-1D (40 features, 10 classes) generated locally.  The ``mnist1d`` package's
  ``make_dataset`` draws from the *global* NumPy RNG (``np.random.seed``), and its ``get_dataset`` tries
  to download a pickle first; neither is acceptable here.  So this module takes the package's digit
  templates (``mnist1d.data.get_templates``) and default parameters (``get_dataset_args``) and re-runs
  its transform pipeline (pad, dilate, scale, translate, correlated + iid noise, shear, subsample) with a
  private ``numpy.random.Generator``.  The generative process matches the package's; individual samples
  do not match the published pickle.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from meshd.store import atomic_write

__all__ = [
    "dirichlet_split",
    "load_digits_dataset",
    "load_mnist1d_dataset",
    "train_test_split_indices",
    "write_npz_product",
]

_MAX_SPLIT_ATTEMPTS = 1000


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: features float32 [1797, 64] scaled to [0, 1] (pixel / 16), labels int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported lazily (slow import)

    bunch: Any = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


def load_mnist1d_dataset(num_samples: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D offline: features float32 [num_samples, 40], labels int64 (classes balanced).

    Features are standardised as MNIST-1D does it: one global mean and standard deviation over all values
    (not per feature), so the result has mean 0 and standard deviation 1 overall.  Deterministic in
    ``seed``; the global NumPy RNG is not touched.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"num_samples must be an integer >= 10, got {num_samples!r}")
    from mnist1d.data import get_dataset_args, get_templates  # lazily: the package imports matplotlib

    args: dict[str, Any] = get_dataset_args(as_dict=True)
    templates = get_templates()
    rng = np.random.default_rng(int(seed))
    n_classes = len(templates["y"])
    # Round-robin labels give exactly num_samples rows with balanced classes, then one shuffle.
    labels = np.arange(num_samples, dtype=np.int64) % n_classes
    labels = labels[rng.permutation(num_samples)]
    xs = np.stack([_mnist1d_transform(templates["x"][label], args, rng) for label in labels])
    xs = (xs - xs.mean()) / xs.std()
    y = np.asarray(templates["y"], dtype=np.int64)[labels]
    return xs.astype(np.float32), y


def dirichlet_split(
    labels: np.ndarray, n_domains: int, alpha: float, seed: int, min_per_domain: int = 10
) -> list[np.ndarray]:
    """Split row indices into ``n_domains`` non-IID domains with per-class Dirichlet(alpha) proportions.

    For each class, its (shuffled) rows are cut among the domains by proportions drawn from
    ``Dirichlet(alpha * 1)``; small ``alpha`` (0.1) gives each domain few classes, large ``alpha`` (100)
    is close to IID.  The draw is repeated until every domain has at least ``min_per_domain`` rows
    (at most 1000 attempts, then ``ValueError``).  Returns sorted int64 index arrays that together cover
    every index exactly once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(n_domains, bool) or not isinstance(n_domains, int) or n_domains < 1:
        raise ValueError(f"n_domains must be a positive integer, got {n_domains!r}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if min_per_domain < 0:
        raise ValueError(f"min_per_domain must be >= 0, got {min_per_domain!r}")
    n = labels.shape[0]
    if n < n_domains * min_per_domain:
        raise ValueError(f"{n} rows cannot give {n_domains} domains at least {min_per_domain} rows each")
    rng = np.random.default_rng(int(seed))
    classes = np.unique(labels)
    for _ in range(_MAX_SPLIT_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_domains)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            proportions = rng.dirichlet(np.full(n_domains, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].append(chunk)
        domains = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(d.size for d in domains) >= min_per_domain:
            return domains
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} rows into {n_domains} domains gave every domain "
        f">= {min_per_domain} rows in {_MAX_SPLIT_ATTEMPTS} attempts; raise alpha or lower min_per_domain"
    )


def train_test_split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)``: sorted (train, test) int64 indices; test gets floor(n * fraction)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    perm = np.random.default_rng(int(seed)).permutation(n).astype(np.int64)
    n_test = int(np.floor(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def write_npz_product(path: Path, x: np.ndarray, y: np.ndarray, label_dtype: type[np.generic] = np.int64) -> None:
    """Write a data product ``.npz`` with arrays ``x`` (float32 [N, D]) and ``label`` ([N], int64 class labels
    unless ``label_dtype`` says otherwise, e.g. float32 regression targets), atomically.

    Load it with ``meshd.task.data.load_data_product(path, label="label", features=None, ...)``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x [N, D] and y [N], got {x.shape} and {y.shape}")
    buf = io.BytesIO()
    np.savez(buf, x=x.astype(np.float32), label=y.astype(label_dtype))
    atomic_write(Path(path), buf.getvalue(), mode=0o644)


# --------------------------------------------------------------------------------------------- helpers


def _mnist1d_transform(template: np.ndarray, args: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """mnist1d.transform.transform for the signal only, drawing from ``rng`` instead of np.random."""
    from scipy.ndimage import gaussian_filter

    x = template + 1e-8
    low, high = args["padding"]
    pad = low + int(rng.random() * (high - low + 1))
    x = np.concatenate([x, np.zeros(pad)])  # pad
    x = _interpolate(x, args["template_len"] + high)  # dilate
    x = x * (1 + args["scale_coeff"] * (rng.random() - 0.5))  # scale
    k = int(rng.integers(args["max_translation"]))  # translate (roll right by k)
    x = np.concatenate([x[-k:], x[:-k]]) if k else x
    mask = x != 0  # correlated noise where the signal is zero (the padding), then iid noise everywhere
    x = mask * x + (1 - mask) * gaussian_filter(args["corr_noise_scale"] * rng.standard_normal(x.shape), 2)
    x = x + args["iid_noise_scale"] * rng.standard_normal(x.shape)
    coeff = args["shear_scale"] * (rng.random() - 0.5)  # shear
    x = x - coeff * np.linspace(-0.5, 0.5, len(x))
    return _interpolate(x, args["final_seq_length"])  # subsample


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    # Linear resampling onto n evenly spaced points, as mnist1d's interp1d(kind="linear") does.
    return np.asarray(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x), dtype=np.float64)
