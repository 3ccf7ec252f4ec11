"""Face-verification metrics: ROC, TAR at fixed FAR, and the LFW 10-fold pair accuracy.

Everything works on *pair scores* (higher = more likely the same identity) and *pair labels* (1/True = same,
0/False = different).  Scores come from anywhere; ``pair_scores`` turns two aligned embedding arrays into cosine
similarities.  A pair is accepted ("same") when ``score >= threshold``.  numpy (and optionally torch inputs) only.

    scores = pair_scores(emb[idx_a], emb[idx_b])
    report = verification_report(scores, same)   # accuracy (10-fold), TAR@FAR, ROC, AUC
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

__all__ = ["pair_scores", "sample_pairs", "all_pairs", "roc_curve", "auc", "tar_at_far", "accuracy_at_threshold",
           "best_threshold", "kfold_accuracy", "KFoldResult", "verification_report"]


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch
        a = a.detach().cpu()
        if str(a.dtype) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


def _check_scores_labels(scores, labels):
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    y = _as_numpy(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0/1 or boolean (1 = same identity)")
        y = y.astype(bool)
    return s, y


def pair_scores(emb_a, emb_b, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity of each row of ``emb_a`` with the same row of ``emb_b`` (both (N, D))."""
    a = _as_numpy(emb_a).astype(np.float64)
    b = _as_numpy(emb_b).astype(np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    return np.einsum("nd,nd->n", a, b)


def all_pairs(classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of samples: (idx_a, idx_b, same)."""
    c = _as_numpy(classes).reshape(-1)
    ia, ib = np.triu_indices(c.shape[0], k=1)
    return ia, ib, c[ia] == c[ib]


def sample_pairs(classes, n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_pos`` distinct same-class and ``n_neg`` distinct different-class unordered pairs, drawn without
    replacement (an LFW-style balanced set when n_pos == n_neg).  Returns (idx_a, idx_b, same), shuffled."""
    rng = np.random.default_rng(seed)
    ia, ib, same = all_pairs(classes)
    pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
    if n_pos > pos.size or n_neg > neg.size:
        raise ValueError(f"asked for {n_pos} positive / {n_neg} negative pairs, only {pos.size} / {neg.size} exist")
    pick = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    pick = rng.permutation(pick)
    return ia[pick], ib[pick], same[pick]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing: the first is +inf (accept nothing: (0, 0)), then every
    distinct score, the last being the minimum score (accept everything: (1, 1)).  Point k is the rate of
    positive / negative pairs with ``score >= thresholds[k]``."""
    s, y = _check_scores_labels(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need both positive and negative pairs, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # the last index of every run of equal scores: thresholds sit on distinct values
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def auc(fpr, tpr) -> float:
    """Area under a curve given by its points (trapezoid rule), e.g. the ROC from ``roc_curve``."""
    x, y = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def tar_at_far(scores, labels, far: float) -> tuple[float, float]:
    """(TAR, threshold): the highest true-accept rate over thresholds whose false-accept rate is <= ``far``.

    With N negative pairs only FAR values that are multiples of 1/N are reachable; when far < 1/N the answer is
    the TAR at FAR = 0 (the threshold just above the best-scoring negative).  Check ``far * N >= 1`` (better
    >= 10) before reading much into it."""
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    fpr, tpr, thr = roc_curve(scores, labels)
    ok = np.flatnonzero(fpr <= far + 1e-12)   # fpr is non-decreasing: ok is a prefix, never empty (index 0)
    k = ok[-1]
    return float(tpr[k]), float(thr[k])


def accuracy_at_threshold(scores, labels, threshold: float) -> float:
    """Fraction of pairs classified right by ``score >= threshold`` -> same."""
    s, y = _check_scores_labels(scores, labels)
    return float(np.mean((s >= threshold) == y))


def best_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, accuracy): the threshold maximising pair accuracy on these pairs.

    Candidates are the midpoints between consecutive distinct scores plus one value below the minimum and one
    above the maximum, which reach every distinct split of the sorted scores exactly.  Among equally good
    candidates the middle one (in score order) is taken."""
    s, y = _check_scores_labels(scores, labels)
    u = np.unique(s)
    span = max(float(u[-1] - u[0]), 1.0)
    cand = np.r_[u[0] - span, (u[:-1] + u[1:]) / 2.0, u[-1] + span]
    # correct(t) = #pos with s >= t + #neg with s < t, for every candidate at once
    pos_sorted, neg_sorted = np.sort(s[y]), np.sort(s[~y])
    pos_accepted = pos_sorted.size - np.searchsorted(pos_sorted, cand, side="left")
    neg_rejected = np.searchsorted(neg_sorted, cand, side="left")
    correct = pos_accepted + neg_rejected
    best = np.flatnonzero(correct == correct.max())
    k = best[(best.size - 1) // 2]
    return float(cand[k]), float(correct[k] / s.size)


@dataclasses.dataclass
class KFoldResult:
    mean: float                 # mean accuracy over the folds
    std: float                  # population std over the folds (numpy's default, as insightface reports it)
    fold_accuracies: np.ndarray
    thresholds: np.ndarray      # the threshold chosen on the other folds, per fold

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.std:.4f}"


def kfold_accuracy(scores, labels, n_folds: int = 10, folds: Optional[np.ndarray] = None) -> KFoldResult:
    """The LFW protocol: split the pairs into ``n_folds`` contiguous folds (``np.array_split`` order, as LFW's
    pairs.txt is 10 consecutive sets); for each fold choose the best threshold on the other folds and measure
    accuracy on this one.  ``folds`` (an int fold id per pair) overrides the contiguous split."""
    s, y = _check_scores_labels(scores, labels)
    if folds is None:
        if n_folds < 2 or n_folds > s.size:
            raise ValueError(f"n_folds must be in [2, n_pairs={s.size}], got {n_folds}")
        folds = np.empty(s.size, dtype=np.int64)
        for k, part in enumerate(np.array_split(np.arange(s.size), n_folds)):
            folds[part] = k
    else:
        folds = _as_numpy(folds).reshape(-1)
        if folds.shape != s.shape:
            raise ValueError("folds must give one fold id per pair")
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError("need at least two folds")
    accs, thrs = [], []
    for k in ids:
        test = folds == k
        thr, _ = best_threshold(s[~test], y[~test])
        thrs.append(thr)
        accs.append(float(np.mean((s[test] >= thr) == y[test])))
    accs_a = np.asarray(accs)
    return KFoldResult(float(accs_a.mean()), float(accs_a.std()), accs_a, np.asarray(thrs))


def verification_report(scores, labels, fars: Sequence[float] = (1e-2, 1e-3, 1e-4), n_folds: int = 10,
                        folds: Optional[np.ndarray] = None) -> dict:
    """Everything at once, as plain Python numbers (JSON-ready) plus the ROC arrays:
    accuracy / accuracy_std (k-fold), auc, tar_at_far {far: tar}, far_reliable {far: far * n_neg >= 1},
    n_pos, n_neg, and roc (fpr, tpr, thresholds) as numpy arrays."""
    s, y = _check_scores_labels(scores, labels)
    kf = kfold_accuracy(s, y, n_folds=n_folds, folds=folds)
    fpr, tpr, thr = roc_curve(s, y)
    n_neg = int((~y).sum())
    return {
        "accuracy": kf.mean,
        "accuracy_std": kf.std,
        "auc": auc(fpr, tpr),
        "tar_at_far": {float(f): tar_at_far(s, y, f)[0] for f in fars},
        "far_reliable": {float(f): bool(f * n_neg >= 1.0) for f in fars},
        "n_pos": int(y.sum()),
        "n_neg": n_neg,
        "roc": (fpr, tpr, thr),
    }
