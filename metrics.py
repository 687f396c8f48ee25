"""Segmentation metrics in pure NumPy: DSC, ASD, HD and HD95, distances in millimetres.

Convention: medpy 0.5.2 (``medpy.metric.binary`` with ``connectivity=1``), value for value.

- A mask is a boolean (or 0/1) array of any ndim >= 1. Spacing is the voxel size in mm along each
  array axis, in array axis order (for NIfTI: the header zooms), default 1.0 everywhere; each
  value must lie in SPACING_RANGE (1e-4 to 1e4 mm).
- surface(A) = A XOR erosion(A), eroding with the face-connected cross (the connectivity-1
  structuring element: 2 neighbours in 1D, 4 in 2D, 6 in 3D), space outside the array counting
  as background. Foreground voxels on the array edge are therefore surface.
- Distances join voxel centres: |(p - q) * spacing|_2. For the surface voxels of A, taken in C
  order, D_AB holds each one's distance to the nearest surface voxel of B (medpy's
  ``__surface_distances(A, B)``); D_BA likewise the other way.
- DSC  = 2 |A & B| / (|A| + |B|).
- HD   = max(max D_AB, max D_BA).
- HD95 = numpy.percentile(concatenate(D_AB, D_BA), 95): both directions pooled, linear
  interpolation (medpy ``hd95``; MONAI instead takes the larger of the two directed percentiles).
- ASD  = mean(concatenate(D_AB, D_BA)) = (sum D_AB + sum D_BA) / (|D_AB| + |D_BA|): the mean over
  the surface voxels of both masks pooled (the paper's "average symmetric distance", medpy 0.5.2
  ``assd``). medpy <= 0.4 returned (mean D_AB + mean D_BA) / 2 instead (medpy issue #108).
- Empty masks, where medpy raises: both empty -> DSC 1, ASD = HD = HD95 = 0; exactly one empty ->
  DSC 0, ASD = HD = HD95 = NaN. summarize() leaves NaNs out and counts them.

Nearest surface voxels are found exactly (no distance transform of the volume), inside the
bounding box of A | B only. Each surface voxel first probes the other surface at integer offsets in
increasing order of length in mm (up to BALL_SIZE offsets, in shells; a voxel leaves at its first
hit, which is its nearest). Those left over, far from the other surface, go in spatially compact
groups, each searched by blocked BLAS products against only the candidates that the triangle
inequality cannot rule out; the best pairs are recomputed with scipy's formula, so every distance is
sqrt(sum_i ((p_i - q_i) * spacing_i)^2) of a true nearest pair. Search temporaries are blocks of at
most BLOCK_ELEMENTS elements; beyond them, memory is a few boolean masks of the volume and the box.

Clinical indices (ACDC definitions): volume_ml, ejection_fraction, and agreement (Pearson r, bias,
sd of the differences with ddof=1, limits of agreement bias -/+ 1.96 sd) over a dataset.

The CLI refuses a PRED whose shape, origin or axis directions differ from GT's (AFFINE_TOL); gzipped
files are read in full, so a CRC32 or length mismatch is an error, not silently wrong voxels.

API: surface, directed_distances, dice, hd, hd95, assd, evaluate, summarize, volume_ml,
ejection_fraction, agreement.
CLI: ``python metrics.py PRED.nii.gz GT.nii.gz [--labels 1 2 3]`` and ``python metrics.py --bench``.
"""

import argparse
import contextlib
import gzip
import logging
import math
from html import escape
import sys
import time
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

METRICS = ("dsc", "assd", "hd", "hd95")
AFFINE_TOL = 1e-3  # largest difference (mm, or unitless direction cosine) accepted between PRED's and GT's pose
LABEL_MAX = 2**31 - 1  # --labels range: 0..LABEL_MAX
SPACING_RANGE = (1e-4, 1e4)  # mm: plausible voxel sizes; beyond them distances overflow or a header is damaged
BALL_SIZE = 4096  # offsets probed around each surface voxel before the brute-force fallback
BLOCK_ELEMENTS = 1 << 21  # largest temporary array in elements: 16 MiB of float64 or int64
LEAF_SIZE = 256  # far queries per group sharing one set of candidate targets


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_mask(x, name):
    """x as a bool array of ndim >= 1; ValueError unless it holds only 0/1/False/True."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.dtype == bool:
        return x
    if not np.issubdtype(x.dtype, np.number) or not np.all((x == 0) | (x == 1)):
        raise ValueError(f"{name} must be binary (only 0/1 or False/True), got dtype {x.dtype}")
    return x.astype(bool)


def _as_labels(x, name):
    """x as an integer label array of ndim >= 1 (integral floats accepted, as NIfTI stores them)."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.dtype.kind in "biu":
        return x
    if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        return x
    raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype} with non-integer values")


def _as_spacing(spacing, ndim):
    """Spacing as a (ndim,) float64 array of finite positive values within SPACING_RANGE; None means all 1.0."""
    if spacing is None:
        return np.ones(ndim)
    try:
        s = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"spacing needs one number per array axis ({ndim}), got {spacing!r}") from None
    if s.shape != (ndim,):
        raise ValueError(f"spacing needs one number per array axis ({ndim}), got {spacing!r}")
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"spacing must be finite and positive, got {spacing!r}")
    if not np.all((s >= SPACING_RANGE[0]) & (s <= SPACING_RANGE[1])):
        raise ValueError(f"spacing {', '.join(f'{v:g}' for v in s)} mm is outside the plausible range "
                         f"{SPACING_RANGE[0]:g}-{SPACING_RANGE[1]:g} mm")
    return s


def _check_same_shape(a, b, names=("a", "b")):
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in shape: {a.shape} vs {b.shape}")


def _check_pair(a, b, spacing):
    """Validated (a, b, spacing): two bool masks of one shape and a (ndim,) float64 spacing."""
    a, b = _as_mask(a, "a"), _as_mask(b, "b")
    _check_same_shape(a, b)
    return a, b, _as_spacing(spacing, a.ndim)


# ---------------------------------------------------------------------------------------------
# Surfaces and boxes


def surface(mask):
    """Surface voxels of a binary mask: mask XOR its erosion by the face-connected cross.

    mask: bool/0-1 array, any shape with ndim >= 1. Returns a bool array of the same shape.
    Outside the array counts as background, so foreground on the array edge is surface.
    """
    mask = _as_mask(mask, "mask")
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis, n in enumerate(mask.shape):
        for start in (0, 2):  # the neighbour before and after along this axis
            window = [slice(1, -1)] * mask.ndim
            window[axis] = slice(start, start + n)
            interior &= padded[tuple(window)]
    return mask & ~interior


def _bbox(mask):
    """Bounding box of a non-empty bool mask: (lo, hi), each (ndim,) int, hi exclusive."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        lo.append(hit[0])
        hi.append(hit[-1] + 1)
    return np.array(lo), np.array(hi)


def _crop(mask, lo, hi, pad):
    """mask[lo:hi] with pad (ndim,) background voxels added on both sides of every axis."""
    out = np.zeros(tuple(hi - lo + 2 * pad), dtype=bool)
    out[tuple(slice(p, p + h - l) for l, h, p in zip(lo, hi, pad))] = mask[
        tuple(slice(l, h) for l, h in zip(lo, hi))
    ]
    return out


def _sqnorm(diff, spacing):
    """Squared length in mm of integer voxel offsets diff (..., ndim), summed in axis order.

    Same arithmetic as scipy's distance_transform_edt, so equal offsets give equal bits.
    """
    total = np.zeros(diff.shape[:-1])
    for axis, s in enumerate(spacing):
        total += (diff[..., axis].astype(np.float64) * s) ** 2
    return total


@lru_cache(maxsize=32)
def _ball(spacing):
    """Integer offsets within a ball of about BALL_SIZE voxels, sorted by length in mm.

    spacing: tuple of ndim floats. Returns (offsets (K, ndim) int64, sqdist (K,) float64): every
    offset up to the ball's radius is present, so a prefix holds all offsets up to its last length.
    The arrays are read-only (cached).
    """
    s = np.array(spacing)
    unit_ball = math.pi ** (s.size / 2) / math.gamma(s.size / 2 + 1)
    radius = float((BALL_SIZE * np.prod(s) / unit_ball) ** (1 / s.size))
    reach = np.floor(radius / s).astype(np.int64)
    grid = np.indices(tuple(2 * reach + 1)).reshape(s.size, -1).T - reach
    sqdist = _sqnorm(grid, s)
    inside = sqdist <= radius**2
    order = np.argsort(sqdist[inside], kind="stable")
    offsets, sqdist = grid[inside][order], sqdist[inside][order]
    offsets.flags.writeable = sqdist.flags.writeable = False
    return offsets, sqdist


def _boxed_surfaces(a, b, spacing):
    """Surfaces of two non-empty masks, cropped to the bounding box of a | b and padded.

    a, b: bool arrays of one shape; spacing: (ndim,) float64. Returns (sa, sb, probe): sa, sb bool
    arrays of one (cropped) shape; probe = (flat offsets (K,), sqdist (K,)) for them, by length.
    The padding (>= 1 voxel of background) keeps the surfaces exact and every probe in bounds.
    """
    lo, hi = _bbox(a | b)
    offsets, sqdist = _ball(tuple(spacing))
    fits = np.all(np.abs(offsets) < hi - lo, axis=1)  # longer offsets cannot join two box voxels
    offsets, sqdist = offsets[fits], sqdist[fits]
    pad = np.maximum(np.abs(offsets).max(axis=0), 1)
    sa, sb = surface(_crop(a, lo, hi, pad)), surface(_crop(b, lo, hi, pad))
    strides = np.cumprod((sa.shape[1:] + (1,))[::-1])[::-1]
    return sa, sb, (offsets @ strides, sqdist)


# ---------------------------------------------------------------------------------------------
# Exact nearest surface voxel


def _first_hits(queries, target, shell):
    """For each query, whether target is set at some query + shell offset, and the first such one.

    queries: (n,) flat indices; target: flat bool array; shell: (k,) flat offsets.
    Returns (found (n,) bool, first (n,) int index into shell).
    """
    found = np.empty(queries.size, dtype=bool)
    first = np.empty(queries.size, dtype=np.intp)
    step = max(1, BLOCK_ELEMENTS // shell.size)
    for i in range(0, queries.size, step):
        hits = target[queries[i : i + step, None] + shell]  # (step, k)
        found[i : i + step] = hits.any(axis=1)
        first[i : i + step] = hits.argmax(axis=1)
    return found, first


def _probe_ball(queries, target, offsets, sqdist):
    """Squared distance from each query to the nearest target voxel among the given offsets.

    queries: (n,) flat indices; target: flat bool array; offsets: (K,) flat offsets sorted by
    their squared length sqdist (K,). Returns (n,) float64, inf where no offset hits.
    Offsets go in shells of growing size; a query leaves at its first hit, the nearest one.
    """
    best = np.full(queries.size, np.inf)
    todo = np.arange(queries.size)
    bounds = np.unique(np.minimum(8 * 4 ** np.arange(16), offsets.size))
    for start, stop in zip(np.r_[0, bounds[:-1]], bounds):
        found, first = _first_hits(queries[todo], target, offsets[start:stop])
        best[todo[found]] = sqdist[start:stop][first[found]]
        todo = todo[~found]
        if todo.size == 0:
            break
    return best


def _centred_mm(q, t, spacing):
    """Coordinates in mm of integer points q (n, ndim) and t (m, ndim) about a common centre."""
    centre = (np.minimum(q.min(axis=0), t.min(axis=0)) + np.maximum(q.max(axis=0), t.max(axis=0))) // 2
    return (q - centre) * spacing, (t - centre) * spacing


def _lift(x, target=False):
    """Rows [x, 1, |x|^2] (queries) or [-2x, |x|^2, 1] (targets) of mm points x (n, ndim): a query
    row times a target row is their squared distance |x|^2 + |y|^2 - 2 x.y, so BLAS ranks pairs."""
    xx = np.einsum("ij,ij->i", x, x)
    ones = np.ones(len(x))
    return np.column_stack((-2 * x, xx, ones) if target else (x, ones, xx))


def _product(a, b):
    """a @ b.T for a (n, k), b (m, k), in column blocks of at most 2^18 multiply-adds per BLAS call.

    OpenBLAS runs such small products on the calling thread only; larger ones it splits across
    threads, which stall for whole scheduler time slices when other processes keep the cores busy.
    """
    out = np.empty((len(a), len(b)))
    step = max(1, (1 << 18) // (a.shape[1] * len(a)))
    for j in range(0, len(b), step):
        np.matmul(a, b[j : j + step].T, out=out[:, j : j + step])
    return out


def _rounding_bound(x, y):
    """Safe bound on the absolute rounding error of a _lift product between rows of x and y."""
    largest = np.max(np.einsum("ij,ij->i", x, x)) + np.max(np.einsum("ij,ij->i", y, y))
    return 16 * (x.shape[1] + 2) * np.finfo(np.float64).eps * largest


def _min_sqdist(q, t, spacing):
    """Exact squared distance in mm^2 from each point of q to its nearest point of t.

    q: (n, ndim), t: (m, ndim) integer voxel coordinates, n, m >= 1; returns (n,) float64.
    A BLAS product ranks the pairs block by block; the best pair, and any other within twice
    the rounding bound of it, is recomputed with _sqnorm, so the result is the exact minimum.
    """
    x, y = _centred_mm(q, t, spacing)
    lifted_q, lifted_t = _lift(x), _lift(y, target=True)
    tol = _rounding_bound(x, y)
    best = np.full(len(q), np.inf)
    rows = np.arange(len(q))
    step = max(1, BLOCK_ELEMENTS // len(q))
    for j in range(0, len(t), step):
        block = t[j : j + step]
        approx = _product(lifted_q, lifted_t[j : j + step])  # (n, step) squared distances, rounded
        first = approx.argmin(axis=1)
        limit = approx[rows, first] + 2 * tol
        exact = _sqnorm(q - block[first], spacing)
        approx[rows, first] = np.inf
        tied = np.flatnonzero(approx.min(axis=1) <= limit)  # another pair may be nearer
        if tied.size:
            r, c = np.nonzero(approx[tied] <= limit[tied, None])
            np.minimum.at(exact, tied[r], _sqnorm(q[tied[r]] - block[c], spacing))
        np.minimum(best, exact, out=best)
    return best


def _kd_leaves(points, size):
    """Split range(len(points)) into spatially compact index arrays of <= size points each,
    by recursive median splits along the widest axis. points: (n, ndim) float."""
    leaves, todo = [], [np.arange(len(points))]
    while todo:
        idx = todo.pop()
        if idx.size <= size:
            leaves.append(idx)
            continue
        p = points[idx]
        half = np.argpartition(p[:, np.argmax(np.ptp(p, axis=0))], idx.size // 2)
        todo += [idx[half[: idx.size // 2]], idx[half[idx.size // 2 :]]]
    return leaves


def _far_min_sqdist(q, t, spacing):
    """Exact squared distance in mm^2 from each point of q to its nearest point of t.

    q: (n, ndim), t: (m, ndim) integer voxel coordinates, n, m >= 1; returns (n,) float64.
    Meant for queries far from t. They go in compact leaves; a leaf of centre c and radius r
    needs only the targets within d(c) + 2r of c, d(c) being c's nearest-target distance:
    every query q of the leaf has d(q) <= d(c) + |q - c| (triangle inequality).
    """
    x, y = _centred_mm(q, t, spacing)
    leaves = _kd_leaves(x, LEAF_SIZE)
    centres = np.array([x[leaf].mean(axis=0) for leaf in leaves])
    radii = np.array([np.sqrt(np.max(np.sum((x[leaf] - c) ** 2, axis=1))) for leaf, c in zip(leaves, centres)])
    lifted_c, lifted_t = _lift(centres), _lift(y, target=True)
    tol = _rounding_bound(centres, y)
    best = np.empty(len(q))
    step = max(1, BLOCK_ELEMENTS // len(t))
    for i in range(0, len(leaves), step):
        d2 = _product(lifted_c[i : i + step], lifted_t)  # (leaves, m) squared distances, rounded
        reach = (np.sqrt(d2.min(axis=1) + tol) + 2 * radii[i : i + step]) * (1 + 1e-9)
        for leaf, row, rho in zip(leaves[i : i + step], d2, reach):
            best[leaf] = _min_sqdist(q[leaf], t[row <= rho**2 + tol], spacing)
    return best


def _nearest(source, target, probe, spacing):
    """Distance in mm from every source voxel (C order) to the nearest target voxel.

    source, target: bool arrays of one shape, target non-empty, padded as by _boxed_surfaces;
    probe: its (flat offsets, sqdist). Returns (source.sum(),) float64.
    """
    offsets, sqdist = probe
    queries = np.flatnonzero(source)
    # Probing k offsets costs about as much as a brute-force pass over 4k targets.
    k = max(1, min(offsets.size, np.count_nonzero(target) // 4))
    d2 = _probe_ball(queries, target.ravel(), offsets[:k], sqdist[:k])
    far = np.isinf(d2)  # no target within the k nearest offsets
    if far.any():
        q = np.stack(np.unravel_index(queries[far], source.shape), axis=1)
        d2[far] = _far_min_sqdist(q, np.argwhere(target), spacing)
    return np.sqrt(d2)


# ---------------------------------------------------------------------------------------------
# Metrics on binary masks


def directed_distances(a, b, spacing=None):
    """Distance in mm from each surface voxel of a (C order) to the nearest surface voxel of b.

    a, b: binary arrays of one shape (ndim >= 1); spacing: ndim positive floats (mm), axis order.
    Returns a 1D float64 array with one entry per surface voxel of a (empty if a is empty, all
    inf -- the nearest of nothing -- if only b is empty). Equals medpy's __surface_distances(a, b).
    """
    a, b, spacing = _check_pair(a, b, spacing)
    if not (a.any() and b.any()):
        return np.full(np.count_nonzero(surface(a)), np.inf)
    sa, sb, probe = _boxed_surfaces(a, b, spacing)
    return _nearest(sa, sb, probe, spacing)


def _dice(a, b):
    """DSC of two bool masks; both empty -> 1.0 (one empty -> 0.0 by the formula)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def _distance_metrics(a, b, spacing):
    """{"assd", "hd", "hd95"} in mm of two bool masks of one shape, from one pair of D_AB, D_BA."""
    if not (a.any() and b.any()):
        # medpy raises here. Both empty: perfect agreement, 0 mm; exactly one empty: undefined, NaN.
        value = 0.0 if a.any() == b.any() else math.nan
        return dict.fromkeys(("assd", "hd", "hd95"), value)
    sa, sb, probe = _boxed_surfaces(a, b, spacing)
    pooled = np.concatenate((_nearest(sa, sb, probe, spacing), _nearest(sb, sa, probe, spacing)))
    return {
        "assd": float(pooled.mean()),
        "hd": float(pooled.max()),
        "hd95": float(np.percentile(pooled, 95)),
    }


def dice(a, b):
    """Dice similarity coefficient 2|A & B| / (|A| + |B|) of two binary arrays of one shape.

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    a, b, _ = _check_pair(a, b, None)
    return float(_dice(a, b))


def hd(a, b, spacing=None):
    """Hausdorff distance in mm, max(max D_AB, max D_BA). Both empty -> 0.0; one empty -> NaN."""
    return _distance_metrics(*_check_pair(a, b, spacing))["hd"]


def hd95(a, b, spacing=None):
    """95th percentile (linear) of D_AB and D_BA pooled, in mm. Both empty -> 0.0; one -> NaN."""
    return _distance_metrics(*_check_pair(a, b, spacing))["hd95"]


def assd(a, b, spacing=None):
    """Average symmetric surface distance in mm: the mean of D_AB and D_BA pooled,
    (sum D_AB + sum D_BA) / (|D_AB| + |D_BA|). Both empty -> 0.0; exactly one empty -> NaN.
    """
    return _distance_metrics(*_check_pair(a, b, spacing))["assd"]


# ---------------------------------------------------------------------------------------------
# Label volumes


def _as_label_list(labels, pred, gt):
    """The requested labels as Python ints; None means every nonzero label present in either."""
    if labels is None:
        present = np.union1d(np.unique(pred), np.unique(gt))
        return [int(v) for v in present if v != 0]
    values = np.atleast_1d(np.asarray(labels))
    integral = values.dtype.kind in "iu" or (values.dtype.kind == "f" and np.all(values == np.round(values)))
    if values.ndim != 1 or not integral:
        raise ValueError(f"labels must be a sequence of integers, got {labels!r}")
    return [int(v) for v in values]


def _label_box(pred, gt, labels):
    """Slices of the bounding box of the given labels in either volume; None if neither has any."""
    boxes = []
    for volume in (pred, gt):
        for label in labels:  # one full-size mask at a time
            mask = volume == label
            if mask.any():
                boxes.append(_bbox(mask))
    if not boxes:
        return None
    lo, hi = np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
    return tuple(slice(l, h) for l, h in zip(lo, hi))


def evaluate(pred, gt, spacing=None, labels=None):
    """DSC, ASD, HD and HD95 per class of two integer label volumes.

    pred, gt: integer label arrays of one shape (ndim >= 1); spacing: ndim positive floats (mm)
    in array axis order; labels: classes to score (default: every nonzero label in either).
    Returns {label: {"dsc", "assd", "hd", "hd95"}} with Python floats. Each class's surfaces are
    taken once and its three distance metrics come from one pair of directed distance arrays.
    """
    pred, gt = _as_labels(pred, "pred"), _as_labels(gt, "gt")
    _check_same_shape(pred, gt, ("pred", "gt"))
    spacing = _as_spacing(spacing, pred.ndim)
    labels = _as_label_list(labels, pred, gt)
    box = _label_box(pred, gt, labels)
    if box is not None:  # outside the box every class is background in both, as outside the array
        pred, gt = pred[box], gt[box]
    results = {}
    for label in labels:
        a, b = pred == label, gt == label
        results[label] = {"dsc": float(_dice(a, b)), **_distance_metrics(a, b, spacing)}
    return results


def _nanmean(values):
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _class_mean(result):
    """{metric: nanmean over the classes} of one evaluate() result."""
    return {m: _nanmean([scores[m] for scores in result.values()]) for m in METRICS}


def _mean_std(values):
    """{"mean", "std", "n_nan"} of a list of floats, NaNs left out and counted."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    mean, std = (float(kept.mean()), float(kept.std())) if kept.size else (math.nan, math.nan)
    return {"mean": mean, "std": std, "n_nan": int(values.size - kept.size)}


def summarize(rows):
    """Mean and standard deviation over volumes of per-volume evaluate() results.

    rows: list of evaluate() dicts, one per volume, all with the same labels.
    Returns {key: {metric: {"mean", "std", "n_nan"}}} where key runs over the labels and "mean",
    the per-volume mean over classes (nanmean over that volume's classes; NaN if all are NaN).
    NaNs are left out of mean and std (population std, ddof=0) and counted in n_nan.
    """
    if not rows:
        raise ValueError("summarize needs at least one evaluate() result")
    labels = list(rows[0])
    if any(sorted(row) != sorted(labels) for row in rows):
        raise ValueError("summarize needs results with the same labels for every volume")
    columns = {label: [row[label] for row in rows] for label in labels}
    columns["mean"] = [_class_mean(row) for row in rows]
    return {key: {m: _mean_std([v[m] for v in vols]) for m in METRICS} for key, vols in columns.items()}


# ---------------------------------------------------------------------------------------------
# Clinical indices (ACDC challenge definitions)


def volume_ml(mask, spacing):
    """Structure volume in ml: voxel count x product of the voxel sizes in mm / 1000.

    mask: binary array (ndim >= 1), e.g. ``labels == 3`` for the ACDC LV cavity; spacing: one voxel
    size in mm per array axis. Myocardial mass (g) is volume_ml(MYO at ED) x 1.05.
    """
    mask = _as_mask(mask, "mask")
    return float(np.count_nonzero(mask) * np.prod(_as_spacing(spacing, mask.ndim)) / 1000.0)


def ejection_fraction(edv, esv):
    """Ejection fraction in %: 100 x (EDV - ESV) / EDV from the ED and ES volumes of one patient.

    edv, esv: numbers or arrays of one shape (ml); NaN where EDV is 0 or NaN (or ESV is NaN).
    Returns a Python float for scalars, else a float64 array.
    """
    edv, esv = np.asarray(edv, dtype=np.float64), np.asarray(esv, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ef = np.where(edv != 0, 100.0 * (edv - esv) / edv, math.nan)
    return float(ef) if ef.ndim == 0 else ef


def _pearson(x, y):
    """Pearson correlation of two (n,) float64 arrays; NaN for n < 2 or zero variance in either."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.clip((dx @ dy) / math.sqrt(float(dx @ dx) * float(dy @ dy)), -1.0, 1.0))


def agreement(pred, gt):
    """Agreement over a dataset of one clinical index (volume, EF, mass): prediction against ground truth.

    pred, gt: 1D sequences of one length, one value per case. Pairs where either value is NaN (e.g. an
    empty ground truth) are left out and counted. Returns a dict of Python numbers:
    n (pairs used), n_nan (pairs left out), r (Pearson correlation), bias = mean(pred - gt),
    sd = standard deviation of the differences pred - gt with ddof=1 (sample std, as Bland-Altman),
    loa_low, loa_high = bias -/+ 1.96 sd (95% limits of agreement). NaN where undefined: bias with
    no pair; sd and the limits with fewer than 2 pairs; r with fewer than 2 pairs or zero variance.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.ndim != 1 or pred.shape != gt.shape:
        raise ValueError(f"agreement needs two 1D sequences of one length, got shapes {pred.shape} and {gt.shape}")
    kept = ~(np.isnan(pred) | np.isnan(gt))
    pred, gt = pred[kept], gt[kept]
    diff = pred - gt
    bias = float(diff.mean()) if diff.size else math.nan
    sd = float(diff.std(ddof=1)) if diff.size >= 2 else math.nan
    return {"n": int(diff.size), "n_nan": int(kept.size - diff.size), "r": _pearson(pred, gt), "bias": bias,
            "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def volume_ratios(measured, labels):
    """{class: predicted / true volume summed over the volumes} (NaN where the truth is empty): below 1 a class is
    under-segmented on the whole. measured: [(case, frame, {class: (pred ml, true ml)})] as for clinical_rows."""
    sums = {c: np.sum([ml[c] for _, _, ml in measured], axis=0) for c in labels}
    return {str(c): float(p / t) if t > 0 else math.nan for c, (p, t) in sums.items()}


# ACDC challenge indices (classes 1 RV, 2 MYO, 3 LV): index -> unit. Myocardial mass = MYO volume at ED x 1.05 g/ml.
CLINICAL = {"lv_edv": "ml", "lv_esv": "ml", "lv_sv": "ml", "lv_ef": "%", "rv_edv": "ml", "rv_esv": "ml",
            "rv_sv": "ml", "rv_ef": "%", "myo_mass": "g"}
MYO_DENSITY = 1.05


def clinical_indices(ed, es):
    """CLINICAL's indices of one heart from its class volumes in ml ({class: ml}) at ED and ES: LV and RV
    end-diastolic and end-systolic volume, stroke volume EDV - ESV, ejection fraction 100 (EDV - ESV) / EDV (%),
    myocardial mass at ED (g). A NaN volume makes the indices that use it NaN."""
    out = {}
    for name, c in (("lv", 3), ("rv", 1)):
        out[f"{name}_edv"], out[f"{name}_esv"] = float(ed[c]), float(es[c])
        out[f"{name}_sv"], out[f"{name}_ef"] = float(ed[c] - es[c]), ejection_fraction(ed[c], es[c])
    out["myo_mass"] = float(ed[2] * MYO_DENSITY)
    return out


def cine_indices(frames):
    """CLINICAL's indices of a cine from its class volumes per frame ([{class: ml}]), with ED the frame of the
    largest LV volume and ES that of the smallest (0-based indices "ed", "es"; ties: the first)."""
    lv = [v[3] for v in frames]
    ed, es = int(np.argmax(lv)), int(np.argmin(lv))
    return {"ed": ed, "es": es, **clinical_indices(frames[ed], frames[es])}


def cine_warnings(indices):
    """What no heart does, in a cine's indices (cine_indices): an RV larger at ES than at ED (a negative RV EF; the
    LV's cannot be, ED and ES being its extremes), which swapped chambers give; [] if none."""
    if indices["rv_ef"] >= 0:
        return []
    return [f"RV EF {indices['rv_ef']:.1f} % < 0: the RV is larger at ES (frame {indices['es'] + 1}) than at ED "
            f"(frame {indices['ed'] + 1}), a segmentation error such as swapped chambers (look at the labels)"]


def clinical_rows(measured):
    """One row {case, INDEX_pred, INDEX_gt for INDEX in CLINICAL} per case with an ED and an ES frame.

    measured: [(case, frame "ED" or "ES", {class: (ml predicted, ml ground truth)})]; an empty ground-truth
    structure counts as NaN (the index is undefined, and agreement counts it).
    """
    phases = {}
    for case, frame, ml in measured:
        phases.setdefault(case, {})[frame] = ml
    rows = []
    for case, ml in phases.items():
        if "ED" in ml and "ES" in ml:
            pred = clinical_indices(*({c: v[0] for c, v in ml[p].items()} for p in ("ED", "ES")))
            gt = clinical_indices(*({c: v[1] or math.nan for c, v in ml[p].items()} for p in ("ED", "ES")))
            rows.append({"case": case, **{f"{k}_{side}": idx[k] for k in CLINICAL
                                          for side, idx in (("pred", pred), ("gt", gt))}})
    return rows


def volume_summary(frames, names):
    """(CSV rows: ml per class and frame, numbered from 1 as ACDC's Info.cfg; summary; cine_indices for a cine of the
    ACDC classes 1 RV, 2 MYO, 3 LV, else None) of a scan's class volumes per frame [{class: ml}]; names: by class."""
    indices = cine_indices(frames) if len(frames) > 1 and list(names[1:4]) == ["RV", "MYO", "LV"] else None
    rows = [dict(frame=t + 1, **{f"{names[c]}_ml": v for c, v in m.items()}) for t, m in enumerate(frames)]
    summary = dict(frames=len(frames), frame_numbers="from 1, as ACDC's Info.cfg",
                   volumes_ml={names[c]: [m[c] for m in frames] for c in frames[0]})
    if indices:
        summary.update(indices, ed=indices["ed"] + 1, es=indices["es"] + 1, warnings=cine_warnings(indices))
    return rows, summary, indices


def clinical_agreement(rows):
    """{INDEX: unit, n, n_nan, r, bias, sd, loa_low, loa_high} of clinical_rows: prediction against ground truth."""
    return {k: dict(unit=unit, **agreement([r[f"{k}_pred"] for r in rows], [r[f"{k}_gt"] for r in rows]))
            for k, unit in CLINICAL.items()}


def clinical_table(clinical):
    """clinical_agreement as text: cases used, Pearson r, bias and 95 % limits of agreement (pred - gt)."""
    lines = [f"{'index':10s} {'unit':>4s} {'n':>4s} {'r':>7s} {'bias':>9s} {'limits of agreement':>21s}  NaNs left out"]
    lines += [f"{k:10s} {a['unit']:>4s} {a['n']:4d} {a['r']:7.3f} {a['bias']:9.2f} {a['loa_low']:9.2f} to "
              f"{a['loa_high']:8.2f}  {a['n_nan']}" for k, a in clinical.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures: plain SVG text, no plotting package
SVG_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def ticks(lo, hi, n=6):
    """Round tick values (1, 2 or 5 times a power of ten apart), at most about n, covering [lo, hi]."""
    raw = (hi - lo) / n
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw))
                >= raw)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def svg_plot(series, xlabel, ylabel, title, hlines=(), xlog=False, dodge=0):
    """A plot as SVG text (no plotting package): axes with ticks in the data's units, per series a polyline (unless
    "line" is False) and markers with their values as data-x / data-y (and error bars where "err" is given), dashed
    horizontal lines hlines [(y, label)], and a legend. series: [{"name", "x", "y", "err", "line"}], the last two
    optional; dodge: pixels between series drawn side by side, so that error bars at one x do not hide each other."""
    w, h, left, right, top, bottom = 720, 420, 70, 190, 40, 55
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    xs = [fx(x) for s in series for x in s["x"]]
    ys = [y + sign * e for s in series for y, e in zip(s["y"], s.get("err") or [0] * len(s["y"])) for sign in (-1, 1)]
    ys += [y for y, _ in hlines]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:  # one x value: in the middle
        x0, x1 = x0 - 1, x1 + 1
    pad = (max(ys) - min(ys)) * 0.08 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (w - left - right)                          # noqa: E731
    py = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)                        # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for v in sorted({x for s in series for x in s["x"]}) if xlog else ticks(x0, x1):
        out.append(f'<text x="{px(v):.1f}" y="{h - bottom + 18}" text-anchor="middle">{v:g}</text>')
    for v in ticks(y0, y1):
        out.append(f'<line x1="{left - 4}" y1="{py(v):.1f}" x2="{left}" y2="{py(v):.1f}" stroke="black"/>'
                   f'<text x="{left - 7}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text transform="translate(16 {(top + h - bottom) / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for y, label in hlines:
        out.append(f'<line class="hline" data-y="{y!r}" x1="{left}" y1="{py(y):.1f}" x2="{w - right}" '
                   f'y2="{py(y):.1f}" stroke="grey" stroke-dasharray="5 4"/><text x="{w - right + 4}" '
                   f'y="{py(y) + 4:.1f}" fill="grey">{escape(label)}</text>')
    for i, s in enumerate(series):
        shift = (i - (len(series) - 1) / 2) * dodge
        out += svg_series(s, lambda v, d=shift: px(v) + d, py, SVG_COLOURS[i % len(SVG_COLOURS)],
                          (w - right + 10, top + 18 * i))
    return "\n".join(out + ["</svg>"]) + "\n"


def svg_series(s, px, py, colour, legend):
    """The SVG elements of one series of svg_plot: a group holding its line, markers, error bars and legend entry."""
    out = [f'<g class="series" data-name="{escape(s["name"])}" stroke="{colour}" fill="{colour}">']
    if s.get("line", True) and len(s["x"]) > 1:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s["x"], s["y"]))
        out.append(f'<polyline points="{points}" fill="none" stroke-width="2"/>')
    for k, (x, y) in enumerate(zip(s["x"], s["y"])):
        err = s["err"][k] if s.get("err") else None
        if err:
            out.append(f'<line x1="{px(x):.1f}" y1="{py(y - err):.1f}" x2="{px(x):.1f}" y2="{py(y + err):.1f}"/>')
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" data-x="{x!r}" data-y="{y!r}"'
                   + (f' data-err="{err!r}"' if err else "") + f'><title>{escape(s["name"])}: {x:g}, {y:.3f}'
                   + (f" ± {err:.3f}" if err else "") + "</title></circle>")
    out.append(f'<line x1="{legend[0]}" y1="{legend[1]}" x2="{legend[0] + 18}" y2="{legend[1]}" stroke-width="2"/>'
               f'<text x="{legend[0] + 24}" y="{legend[1] + 4}" stroke="none">{escape(s["name"])}</text></g>')
    return out


def bland_altman_svg(pairs, agreement, title, unit):
    """A Bland-Altman plot (svg_plot) of (prediction, truth) pairs: their mean against their difference, with lines
    at the bias and at its 95 % limits of agreement (agreement's)."""
    a = agreement
    lines = [(a["bias"], f"bias {a['bias']:.1f}"), (a["loa_low"], f"-1.96 sd {a['loa_low']:.1f}"),
             (a["loa_high"], f"+1.96 sd {a['loa_high']:.1f}")]
    series = [dict(name=f"{len(pairs)} cases", x=[(p + t) / 2 for p, t in pairs], y=[p - t for p, t in pairs],
                   line=False)]
    return svg_plot(series, f"mean of prediction and truth, {unit}", f"prediction - truth, {unit}",
                    f"{title}: r {a['r']:.3f}, bias {a['bias']:.2f} {unit}", hlines=lines)


def bland_altman_svgs(rows, agreement):
    """{index: bland_altman_svg} for LV EF, RV EF and LV EDV of clinical_rows, each with at least two pairs."""
    figures = {}
    for k in ("lv_ef", "rv_ef", "lv_edv"):
        pairs = [(r[f"{k}_pred"], r[f"{k}_gt"]) for r in rows if not math.isnan(r[f"{k}_pred"] + r[f"{k}_gt"])]
        if len(pairs) > 1:
            figures[k] = bland_altman_svg(pairs, agreement[k], k.replace("_", " ").upper(), CLINICAL[k])
    return figures


def volume_curve_svg(frames, indices, name):
    """A cine's LV and RV volumes against the frame (numbered from 1) with ED and ES marked: frames [{class: ml}] and
    indices as cine_indices gives them."""
    lv, rv = [m[3] for m in frames], [m[1] for m in frames]
    t = list(range(1, len(frames) + 1))
    series = [dict(name="LV", x=t, y=lv), dict(name="RV", x=t, y=rv),
              dict(name="ED", x=[indices["ed"] + 1], y=[lv[indices["ed"]]], line=False),
              dict(name="ES", x=[indices["es"] + 1], y=[lv[indices["es"]]], line=False)]
    return svg_plot(series, "frame", "volume, ml",
                    f"{name}: LV EF {indices['lv_ef']:.1f} %, RV EF {indices['rv_ef']:.1f} %")


# ---------------------------------------------------------------------------------------------
# Tables of results (ideal.py eval and report)
# Table 1 of the paper (IDEAL, mean of 5 runs; the paper gives no units for ASD and HD).
PAPER_TABLE1 = {
    "acdc": {"1.25": (0.738, 0.677, 2.409), "2.5": (0.846, 0.614, 2.209), "10": (0.879, 0.556, 2.094),
             "100": (0.882, 0.489, 1.999)},
    "mmwhs": {"10": (0.626, 2.397, 5.001), "20": (0.791, 1.798, 3.499), "40": (0.815, 1.355, 2.221),
              "100": (0.826, 1.317, 2.183)},
}
ROW_NAMES = {"ideal": "IDEAL (local+global pre-training, two decoders, Eq. 3)",
             "pretrained-dice-ce": "IDEAL pre-training, supervised fine-tuning, CE + Dice (ideal without Eq. 3's "
                                   "unlabeled term)",
             "pretrained-supervised": "IDEAL pre-training, supervised fine-tuning, CE",
             "supervised": "random init, supervised fine-tuning, CE",
             "global": "global-only pre-training + IDEAL fine-tuning",
             "local": "local-only pre-training + IDEAL fine-tuning",
             "same-decoders": "IDEAL with two ConvTranspose decoders",
             "paper-literal": "IDEAL, Eq. 3 as the paper writes it (one pass, same-view pseudo-labels, every pixel)"}
METRIC_NAMES = dict(zip(METRICS, ("DSC", "ASD mm", "HD mm", "HD95 mm")))
# Published agreement on the ACDC challenge's test set (Bernard et al., IEEE TMI 2018; another split than ours).
ANCHORS = ("ACDC challenge, best methods: LV EF r 0.99 (bias within ±0.5, SD about 3 points), LV EDV r 0.997, "
           "myocardial mass r 0.98-0.99; plain 2D U-Nets trained on ED and ES: LV EF r 0.94-0.97, RV EF r 0.86-0.90; "
           "two human readers differ by 4.6-7.5 EF points (Bernard et al., IEEE TMI 2018, on the challenge's test "
           "set).")
CLINICAL_COLUMNS = ("lv_edv", "lv_esv", "lv_ef", "rv_edv", "rv_esv", "rv_ef", "myo_mass")


def summary_table(summary, names):
    """summarize's result as text: a row per class (names[class]) and the mean, mean ± std over volumes."""
    lines = [f"{'class':12s} {'DSC':>15s} {'ASD mm':>15s} {'HD mm':>15s} {'HD95 mm':>15s}  NaNs left out"]
    for key, row in summary.items():
        if isinstance(row, dict) and "dsc" in row:
            cells = [f"{row[m]['mean']:7.3f} ± {row[m]['std']:5.3f}" for m in METRICS]
            name = "mean" if key == "mean" else names[int(key)]
            n_nan = sum(row[m]["n_nan"] for m in row)
            lines.append(f"{name:12s} " + " ".join(f"{c:>15s}" for c in cells) + f"  {n_nan}")
    return "\n".join(lines)


def table_cell(values):
    """(mean, std, text) of one value per run; a single run's summary entry keeps its std over the volumes."""
    if len(values) == 1 and isinstance(values[0], dict):
        return values[0]["mean"], values[0]["std"], f"{values[0]['mean']:.3f} ± {values[0]['std']:.3f}"
    means = np.array([v["mean"] if isinstance(v, dict) else v for v in values], dtype=float)
    text = f"{means.mean():.3f}" + (f" ± {means.std():.3f}" if len(means) > 1 else "")
    return float(means.mean()), float(means.std()), text


def per_run(record):
    """One run of a report: seed, DSC (best-validation and final checkpoint, mean and per class), predicted / true
    volume per class, and its validation curve's figures."""
    classes = {k: v["dsc"]["mean"] for k, v in record.items() if k.isdigit() and isinstance(v, dict) and "dsc" in v}
    return dict(seed=record["seed"], dsc=record["mean"]["dsc"]["mean"], final_dsc=record["final_dsc"],
                dsc_per_class=classes, volume_ratio=record.get("volume_ratio"), validation=record["validation"])


def results_table(table, paper, split, name):
    """(markdown lines: what the numbers are and the table, whose figure is NAME.svg; JSON results) of {row:
    {fraction: [run records]}} on `split` (ideal.py report); paper: Table 1's (DSC, ASD, HD) beside "ideal", or None."""
    columns = list(METRIC_NAMES.values()) + ["final DSC", "val best", "val spread", "runs"] + \
        (["paper DSC / ASD / HD"] if paper else [])
    scope = "Test set: mean ± std over test volumes" if split == "test" else \
        f"The {split} split (`eval --split {split}`): mean ± std over its volumes"
    lines = [f"{scope} of the per-volume mean over foreground classes for one run, mean ± std of the runs' means over "
             "several (a seed is a whole pipeline: its own pre-trained encoder, labeled volumes and fine-tuning); "
             "distances in mm on the native grid (metrics.py, medpy 0.5.2 convention). DSC: the checkpoint of best "
             "validation Dice; final DSC: the last epoch's. val best: best validation Dice of a run; val spread: max - "
             f"min of its validation Dice over the last 10 epochs (means over runs). Figure: {name}.svg.", "",
             "| row | L % | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    results = []
    for row, fractions in table.items():
        for frac, runs in fractions.items():
            cells = {m: table_cell([r["mean"][m] for r in runs]) for m in METRICS}
            finals = [r["final_dsc"] for r in runs if r["final_dsc"] is not None]
            cells["final_dsc"] = table_cell(finals) if len(finals) == len(runs) else (None, None, "")
            cells.update({f"val_{k}": table_cell([r["validation"][k] for r in runs]) for k in ("best", "spread")})
            texts = [c[2] for c in cells.values()][:len(METRIC_NAMES) + 1] + [
                f"{cells[f'val_{k}'][0]:.3f}" for k in ("best", "spread")] + [str(len(runs))]
            if paper:
                texts.append(" / ".join(map(str, paper[frac])) if row == "ideal" and frac in paper else "")
            lines.append(f"| {ROW_NAMES.get(row, row)} | {frac} | " + " | ".join(texts) + " |")
            results.append(dict(row=row, labeled_percent=float(frac), runs=len(runs),
                                **{m: {"mean": c[0], "std": c[1]} for m, c in cells.items()},
                                per_run=[per_run(r) for r in runs]))
    return lines, results


def results_svg(results, split, title):
    """DSC (mean ± std) against the labeled fraction, one series per row of results_table's results."""
    rows = dict.fromkeys(r["row"] for r in results)
    series = [dict(name=row, x=[r["labeled_percent"] for r in results if r["row"] == row],
                   y=[r["dsc"]["mean"] for r in results if r["row"] == row],
                   err=[r["dsc"]["std"] for r in results if r["row"] == row]) for row in rows]
    return svg_plot(series, "labeled training volumes, %", f"{split} DSC", title, xlog=True, dodge=8)


def clinical_results_table(table, name):
    """(markdown lines: what the numbers are, the DSC table on ED and ES, the index table; JSON results; the pooled
    clinical rows of the best LV EF r, drawn in NAME-bland-altman-*.svg) of {row: {fraction: [eval summaries with
    their clinical.csv "rows"]}} (ideal.py report --clinical)."""
    classes = [k for k in next(iter(next(iter(table.values())).values()))[0]["frames"]["ED"] if k.isdigit()]
    dsc = [f"{f} {c}" for f in ("ED", "ES") for c in classes + ["mean"]]
    lines = ["Test patients, ED and ES frames. DSC per class (1 RV, 2 MYO, 3 LV) on ED and on ES frames; each clinical "
             "index as Pearson r / bias (prediction - truth; ml, %, g), for EF with the 95 % limits of agreement; "
             "mean ± std over seeds (pipelines). " + ANCHORS, "",
             "| row | L % | " + " | ".join(dsc) + " | runs |", "|---|---|" + "---|" * (len(dsc) + 1)]
    index_lines = ["", "| row | L % | " + " | ".join(CLINICAL_COLUMNS) + " |",
                   "|---|---|" + "---|" * len(CLINICAL_COLUMNS)]
    results, best = [], None
    for row, fractions in table.items():
        for frac, runs in fractions.items():
            cells = {f"{f} {c}": table_cell([r["frames"][f][c]["dsc"] for r in runs])
                     for f in ("ED", "ES") for c in classes + ["mean"]}
            agree = {k: {m: table_cell([r["clinical"][k][m] for r in runs])
                         for m in ("r", "bias", "loa_low", "loa_high")} for k in CLINICAL_COLUMNS}
            lines.append(f"| {row} | {frac} | " + " | ".join(c[2] for c in cells.values()) + f" | {len(runs)} |")
            index_lines.append(f"| {row} | {frac} | " + " | ".join(
                f"{a['r'][0]:.3f} / {a['bias'][0]:+.1f}" + (f" [{a['loa_low'][0]:.0f}, {a['loa_high'][0]:.0f}]"
                                                            if k.endswith("_ef") else "")
                for k, a in agree.items()) + " |")
            results.append(dict(row=row, labeled_percent=float(frac), runs=len(runs),
                                **{k: {"mean": c[0], "std": c[1]} for k, c in cells.items()},
                                clinical={k: {m: {"mean": c[0], "std": c[1]} for m, c in a.items()}
                                          for k, a in agree.items()}))
            if best is None or agree["lv_ef"]["r"][0] > best[0]:
                best = (agree["lv_ef"]["r"][0], row, frac, [x for r in runs for x in r["rows"]])
    lines += index_lines + ["", f"Bland-Altman plots of the row of best LV EF r ({best[1]} at {best[2]} %, every "
                            f"seed's patients): `{name}-bland-altman-{{lv_ef,rv_ef,lv_edv}}.svg`."]
    return lines, results, [{k: float(v) for k, v in r.items() if k != "case"} for r in best[3]]


# ---------------------------------------------------------------------------------------------
# Benchmark


def _heart(shape, shift, radius, apex):
    """Label volume (Z, Y, X) uint8 with RV = 1, MYO = 2, LV = 3 (as in ACDC) from slice 1 to apex.

    shift: (Z, 2) in-plane centre offsets in voxels; radius: basal LV radius in voxels.
    """
    z = np.arange(shape[0])[:, None, None]
    y = np.arange(shape[1])[None, :, None] - shape[1] / 2 - shift[:, 0, None, None]
    x = np.arange(shape[2])[None, None, :] - shape[2] / 2 - shift[:, 1, None, None]
    r = radius * (1.0 - 0.5 * np.clip((z - 1) / max(apex - 1, 1), 0.0, 1.0))
    dist = np.hypot(y, x)
    inside = (z >= 1) & (z <= apex)
    lv = inside & (dist < r)
    myo = inside & ~lv & (dist < r + 0.35 * radius)
    rv_blob = (y / (1.6 * radius)) ** 2 + ((x + 1.5 * radius) / radius) ** 2 < 1
    rv = inside & (z < apex) & rv_blob & ~(dist < r + 0.35 * radius)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[rv], labels[myo], labels[lv] = 1, 2, 3
    return labels


def _phantom(shape, seed=0):
    """Seeded (pred, gt) short-axis-like label volumes; pred is gt shifted, resized, jittered per
    slice, one slice longer at the apex, plus a stray LV island, like a decent network output."""
    rng = np.random.default_rng(seed)
    radius = 0.1 * shape[1]
    gt = _heart(shape, np.zeros((shape[0], 2)), radius, apex=shape[0] - 3)
    jitter = rng.normal(0.0, 0.6, (shape[0], 2)) + (1.0, -1.5)
    pred = _heart(shape, jitter, 1.04 * radius, apex=shape[0] - 2)
    y, x = int(0.8 * shape[1]), shape[2] // 2
    pred[shape[0] // 2, y : y + 2, x : x + 3] = 3
    return pred, gt


def _best_time(fn, repeats):
    """Smallest wall time in seconds of repeats calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _medpy_evaluate(pred, gt, spacing, labels):
    """evaluate() computed with medpy (imported here; ImportError if absent)."""
    from medpy.metric import binary

    scores = {}
    for c in labels:
        a, b = pred == c, gt == c
        scores[c] = {"dsc": binary.dc(a, b), "assd": binary.assd(a, b, spacing),
                     "hd": binary.hd(a, b, spacing), "hd95": binary.hd95(a, b, spacing)}
    return scores


def _monai_evaluate(pred, gt, spacing, labels):
    """evaluate() computed with MONAI (imported here; ImportError if absent). Its HD95 is the
    larger of the two directed 95th percentiles, not the pooled one, so it differs by design."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    p = torch.from_numpy(np.stack([pred == c for c in labels])[None])  # (1, classes, *spatial)
    g = torch.from_numpy(np.stack([gt == c for c in labels])[None])
    common = {"include_background": True, "spacing": list(spacing)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI warns about its own internals
        values = {
            "dsc": compute_dice(p, g, include_background=True),
            "assd": compute_average_surface_distance(p, g, symmetric=True, **common),
            "hd": compute_hausdorff_distance(p, g, **common),
            "hd95": compute_hausdorff_distance(p, g, percentile=95, **common),
        }
    return {c: {m: float(values[m][0, i]) for m in METRICS} for i, c in enumerate(labels)}


def _differences(ours, theirs):
    """'metric abs (rel)' for the largest absolute and relative difference of each metric."""
    parts = []
    for m in METRICS:
        x = np.array([ours[c][m] for c in ours])
        y = np.array([theirs[c][m] for c in ours])
        diff = np.abs(x - y)
        parts.append(f"{m} {diff.max():.1e} ({(diff / np.maximum(np.abs(y), 1e-300)).max():.1e})")
    return ", ".join(parts)


def _bench(shape, repeats=5):
    """Print seconds per volume for all four metrics on 3 classes, ours against medpy and MONAI."""
    pred, gt = _phantom(shape)
    spacing, labels = (10.0, 1.5, 1.5), (1, 2, 3)
    ours = evaluate(pred, gt, spacing, labels)
    print(f"volume {shape}, spacing {spacing} mm, classes {labels}, DSC+ASD+HD+HD95, best of {repeats}")
    _print_table(ours)
    seconds = _best_time(lambda: evaluate(pred, gt, spacing, labels), repeats)
    print(f"{'metrics.py':12s} {seconds:8.4f} s/volume")
    for name, run, tries in (("medpy", _medpy_evaluate, 2), ("monai", _monai_evaluate, 3)):
        try:
            theirs = run(pred, gt, spacing, labels)
        except ImportError as err:
            print(f"{name:12s} skipped: {err}")
            continue
        their_seconds = _best_time(lambda: run(pred, gt, spacing, labels), tries)
        print(f"{name:12s} {their_seconds:8.4f} s/volume (x{their_seconds / seconds:.1f}); "
              f"max |diff| (rel): {_differences(ours, theirs)}")


# ---------------------------------------------------------------------------------------------
# Command line


@contextlib.contextmanager
def _quiet_nibabel():
    """Keep nibabel's own log lines (logger ``nibabel.global``, e.g. header fixes) and warnings off stderr."""
    logger = logging.getLogger("nibabel.global")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read_image(path):
    """nibabel NIfTI-1/2 image of a file read in full (gzip: CRC32 and length checked); ValueError for no header,
    non-finite, zero or negative voxel sizes (first 3 axes, as stored) or ones outside SPACING_RANGE, a non-finite
    affine or missing data bytes."""
    import nibabel as nib

    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    klass = next((k for k in (nib.Nifti1Image, nib.Nifti2Image)
                  if k.header_class.may_contain_header(raw[:k.header_class.sizeof_hdr])), None)
    if klass is None:
        raise ValueError("no NIfTI-1 or NIfTI-2 header")
    stored = klass.header_class(raw[:klass.header_class.sizeof_hdr], check=False)
    zooms = stored["pixdim"][1 : 1 + min(3, max(int(stored["dim"][0]), 1))]
    if not np.all(np.isfinite(zooms) & (zooms > 0)):
        raise ValueError(f"voxel sizes {', '.join(f'{z:g}' for z in zooms)} must be finite and positive")
    odd = [f"{z:g}" for z in zooms if not SPACING_RANGE[0] <= z <= SPACING_RANGE[1]]
    if odd:
        raise ValueError(f"voxel sizes {', '.join(odd)} mm are outside the plausible range "
                         f"{SPACING_RANGE[0]:g}-{SPACING_RANGE[1]:g} mm")
    image = klass.from_bytes(raw)
    proxy = image.dataobj
    if len(raw) < proxy.offset + math.prod(proxy.shape) * proxy.dtype.itemsize:
        raise ValueError(f"truncated: header shape {proxy.shape} needs more data than the file holds")
    if not np.isfinite(image.affine).all():
        raise ValueError("the header's affine has non-finite values")
    return image


def _load(path):
    """(labels, zooms, affine) of a NIfTI label volume; ValueError naming the file for any problem."""
    import nibabel as nib

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with _quiet_nibabel():
            image = _read_image(path)
            data = _as_labels(np.asanyarray(image.dataobj), "the volume")
        zooms = tuple(float(z) for z in image.header.get_zooms()[: data.ndim])
        _as_spacing(zooms, data.ndim)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as err:
        problem = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path}: cannot read a label volume: {problem}") from None
    return data, zooms, np.asarray(image.affine, dtype=np.float64)


def _pose(affine):
    """(3, 4) rows of an affine with unit-length axis columns: axis directions and origin (mm), sizes left out."""
    pose = np.asarray(affine, dtype=np.float64)[:3].copy()
    norms = np.linalg.norm(pose[:, :3], axis=0)
    pose[:, :3] /= np.where(norms > 0, norms, 1.0)
    return pose


def _check_geometry(pred, gt, names):
    """ValueError naming PRED unless (labels, zooms, affine) pred and gt have one shape, origin and axis
    directions (within AFFINE_TOL); differing voxel sizes are left to the caller's warning."""
    if pred[0].shape != gt[0].shape:
        raise ValueError(f"{names[0]}: shape {pred[0].shape} differs from {names[1]}: {gt[0].shape}")
    gap = float(np.abs(_pose(pred[2]) - _pose(gt[2])).max())
    if not gap <= AFFINE_TOL:
        raise ValueError(f"{names[0]}: origin or axis directions differ from those of {names[1]} by {gap:.3g} "
                         f"(tolerance {AFFINE_TOL:g}); the prediction is not on the ground truth's voxel grid")


def _print_table(results):
    """Print one row per class (DSC, ASD, HD, HD95 in mm) and the nanmean over classes."""
    print(f"{'class':>6s} {'DSC':>7s} {'ASD mm':>9s} {'HD mm':>9s} {'HD95 mm':>9s}")
    rows = [(str(label), scores) for label, scores in results.items()] + [("mean", _class_mean(results))]
    for name, s in rows:
        print(f"{name:>6s} {s['dsc']:7.4f} {s['assd']:9.3f} {s['hd']:9.3f} {s['hd95']:9.3f}")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line on stderr (exit 2) instead of usage + error."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _label_value(text):
    """argparse type: a class label, an integer 0..LABEL_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= LABEL_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {LABEL_MAX}, got {text}")
    return value


def main(argv=None):
    """CLI: ``PRED GT [--labels ...]`` prints the per-class table; ``--bench`` times the metrics."""
    parser = Parser(
        description="DSC, ASD, HD and HD95 (mm, medpy 0.5.2 convention) of a predicted label "
        "volume against the ground truth, per class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pred", nargs="?", help="predicted label volume (NIfTI)")
    parser.add_argument("gt", nargs="?", help="ground-truth label volume (NIfTI); its zooms give the spacing")
    parser.add_argument("--labels", type=_label_value, nargs="+",
                        help="classes to score (default: nonzero labels in either)")
    parser.add_argument("--bench", action="store_true", help="time the metrics on a synthetic 16x256x256 volume")
    parser.add_argument("--bench-shape", type=int, nargs=3, default=(16, 256, 256), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bench:
        if args.bench_shape[0] < 5 or min(args.bench_shape[1:]) < 16:
            parser.error("--bench-shape needs at least 5 slices of 16x16")
        _bench(tuple(args.bench_shape))
        return 0
    if args.pred is None or args.gt is None:
        parser.error("PRED and GT are required (or --bench)")
    try:
        pred, gt = _load(args.pred), _load(args.gt)
        _check_geometry(pred, gt, (args.pred, args.gt))
    except ValueError as err:
        print(f"metrics.py: error: {err}", file=sys.stderr)
        return 2
    if not np.allclose(pred[1], gt[1], rtol=1e-3):
        print(f"metrics.py: warning: {args.pred}: voxel sizes {pred[1]} differ from the ground "
              f"truth's {gt[1]}; using the ground truth's", file=sys.stderr)
    _print_table(evaluate(pred[0], gt[0], gt[1], args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
