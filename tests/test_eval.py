"""mvloss.eval against hand-computed answers."""
import math

import numpy as np
import pytest
import torch

from mvloss import eval as ev


# ------------------------------------------------------------------------------------------------ pair scores
def test_pair_scores_is_cosine():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[5.0, 0.0], [4.0, -3.0], [-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(ev.pair_scores(a, b), [1.0, 0.0, -1.0, 1 / math.sqrt(2)], atol=1e-12)


def test_pair_scores_accepts_torch_and_zero_rows():
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float16)
    b = torch.tensor([[1.0, 0.0], [2.0, 4.0]], dtype=torch.float16)
    np.testing.assert_allclose(ev.pair_scores(a, b), [0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        ev.pair_scores(np.ones((3, 2)), np.ones((2, 2)))


def test_all_pairs_and_sample_pairs():
    classes = np.array([0, 0, 1, 1, 1])
    ia, ib, same = ev.all_pairs(classes)
    assert len(ia) == 10 and np.all(ia < ib)
    assert same.sum() == 1 + 3  # C(2,2) + C(3,2)
    a, b, s = ev.sample_pairs(classes, 4, 5, seed=3)
    assert s.sum() == 4 and (~s).sum() == 5
    assert np.array_equal(s, classes[a] == classes[b])
    assert len({(x, y) for x, y in zip(a, b)}) == 9  # drawn without replacement
    a2, b2, s2 = ev.sample_pairs(classes, 4, 5, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    with pytest.raises(ValueError):
        ev.sample_pairs(classes, 5, 1)


# ------------------------------------------------------------------------------------------------ ROC
def test_roc_hand_computed():
    # scores:  0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.5(-) 0.4(-)     P = 3, N = 3
    scores = np.array([0.4, 0.9, 0.6, 0.8, 0.5, 0.7])
    labels = np.array([0, 1, 1, 0, 0, 1])
    fpr, tpr, thr = ev.roc_curve(scores, labels)
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    # AUC = P(score+ > score-): pairs (+,-) won: 0.9 beats 3, 0.7 beats 2, 0.6 beats 2 -> 7 / 9
    assert ev.auc(fpr, tpr) == pytest.approx(7 / 9)


def test_roc_ties_are_one_point():
    scores = np.array([0.5, 0.5, 0.5, 0.1])
    labels = np.array([1, 0, 1, 0])
    fpr, tpr, thr = ev.roc_curve(scores, labels)
    np.testing.assert_allclose(thr, [np.inf, 0.5, 0.1])
    np.testing.assert_allclose(tpr, [0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    assert ev.auc(fpr, tpr) == pytest.approx(0.75)  # the tie counts half: (1 + 0.5) / 2


def test_roc_endpoints_and_monotone():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    labels = rng.random(500) < 0.3
    fpr, tpr, thr = ev.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0) and thr[-1] == scores.min()
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    # every point is the rate at score >= threshold
    for k in (1, 17, 200, len(thr) - 1):
        assert tpr[k] == np.mean(scores[labels] >= thr[k])
        assert fpr[k] == np.mean(scores[~labels] >= thr[k])


def test_roc_random_scores_auc_half_and_perfect_auc_one():
    rng = np.random.default_rng(1)
    scores = rng.random(20000)
    labels = rng.random(20000) < 0.5
    assert ev.auc(*ev.roc_curve(scores, labels)[:2]) == pytest.approx(0.5, abs=0.02)
    sep = np.r_[np.linspace(0.6, 1.0, 50), np.linspace(-1.0, 0.5, 70)]
    lab = np.r_[np.ones(50), np.zeros(70)]
    assert ev.auc(*ev.roc_curve(sep, lab)[:2]) == 1.0


def test_roc_input_checks():
    with pytest.raises(ValueError, match="both positive and negative"):
        ev.roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        ev.roc_curve([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        ev.roc_curve([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="length"):
        ev.roc_curve([0.1, 0.2, 0.3], [1, 0])


# ------------------------------------------------------------------------------------------------ TAR @ FAR
def _constructed_set():
    """1000 negatives with distinct scores k/1000 (k = 0..999) and 10 positives at chosen places."""
    neg = np.arange(1000) / 1000.0
    pos = np.array([1.5, 1.2, 0.9995, 0.9985, 0.995, 0.9905, 0.95, 0.5, 0.25, -1.0])
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(1000), np.ones(10)]
    return scores, labels


def test_tar_at_far_constructed():
    scores, labels = _constructed_set()
    # FAR <= 1e-3: at most 1 of 1000 negatives (0.999) accepted -> the lowest such threshold is the next score
    # below it, the positive 0.9985; positives >= 0.9985: 1.5, 1.2, 0.9995, 0.9985
    tar, thr = ev.tar_at_far(scores, labels, 1e-3)
    assert tar == pytest.approx(0.4) and thr == pytest.approx(0.9985)
    # FAR <= 1e-2: 10 negatives (0.990 .. 0.999) -> threshold 0.990; positives >= 0.99: 6 of 10
    tar, thr = ev.tar_at_far(scores, labels, 1e-2)
    assert tar == pytest.approx(0.6) and thr == pytest.approx(0.990)
    # FAR <= 1e-4 < 1/1000: no negative may pass -> threshold just above them: the positive 0.9995 itself
    tar, thr = ev.tar_at_far(scores, labels, 1e-4)
    assert tar == pytest.approx(0.3) and thr == pytest.approx(0.9995)
    # FAR <= 0.5: 500 negatives -> threshold 0.5; positives >= 0.5: 8
    assert ev.tar_at_far(scores, labels, 0.5)[0] == pytest.approx(0.8)
    assert ev.tar_at_far(scores, labels, 1.0)[0] == 1.0
    assert ev.tar_at_far(scores, labels, 0.0)[0] == pytest.approx(0.3)


def test_tar_at_far_separable_is_one():
    scores = np.r_[np.linspace(0.8, 1.0, 40), np.linspace(-0.5, 0.3, 4000)]
    labels = np.r_[np.ones(40), np.zeros(4000)]
    for far in (1e-2, 1e-3, 1e-4, 0.0):
        assert ev.tar_at_far(scores, labels, far)[0] == 1.0
    with pytest.raises(ValueError):
        ev.tar_at_far(scores, labels, 1.5)


# ------------------------------------------------------------------------------------------------ accuracy
def test_best_threshold_hand_computed():
    # sorted: 0.1(-) 0.2(-) 0.3(+) 0.4(-) 0.5(+) 0.6(+)
    scores = np.array([0.6, 0.1, 0.4, 0.3, 0.2, 0.5])
    labels = np.array([1, 0, 0, 1, 0, 1])
    # cut between 0.2|0.3 -> 5/6 (0.4 wrong); between 0.4|0.5 -> 5/6 (0.3 wrong); candidates 0.25 and 0.45:
    # the middle one of the two in score order is the first
    thr, acc = ev.best_threshold(scores, labels)
    assert acc == pytest.approx(5 / 6)
    assert thr == pytest.approx(0.25)
    assert ev.accuracy_at_threshold(scores, labels, 0.45) == pytest.approx(5 / 6)
    assert ev.accuracy_at_threshold(scores, labels, 0.35) == pytest.approx(4 / 6)


def test_best_threshold_separable_is_the_gap_midpoint():
    scores = np.array([0.9, 0.7, 0.2, -0.3, 0.1])
    labels = np.array([True, True, False, False, False])
    thr, acc = ev.best_threshold(scores, labels)
    assert acc == 1.0 and thr == pytest.approx(0.45)


def test_best_threshold_inverted_scores():
    # negatives all score above positives: no threshold beats accepting everybody or nobody (50%)
    scores = np.array([0.1, 0.2, 0.9, 0.8])
    labels = np.array([1, 1, 0, 0])
    thr, acc = ev.best_threshold(scores, labels)
    assert acc == pytest.approx(0.5)
    assert ev.accuracy_at_threshold(scores, labels, thr) == pytest.approx(0.5)


def test_kfold_perfectly_separable():
    rng = np.random.default_rng(0)
    n = 600
    labels = rng.random(n) < 0.5
    scores = np.where(labels, rng.uniform(0.5, 1.0, n), rng.uniform(-1.0, 0.4, n))
    kf = ev.kfold_accuracy(scores, labels, n_folds=10)
    assert kf.mean == 1.0 and kf.std == 0.0
    assert len(kf.fold_accuracies) == 10 and np.all((kf.thresholds > 0.4) & (kf.thresholds < 0.5))


def test_kfold_hand_computed_folds():
    # two folds of four pairs each
    #   fold 0: (+0.9) (+0.8) (-0.3) (-0.6)    fold 1: (+0.7) (+0.2) (-0.4) (-0.1)
    scores = np.array([0.9, 0.8, 0.3, 0.6, 0.7, 0.2, 0.4, 0.1])
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    # fold 0's threshold from fold 1: sorted 0.1- 0.2+ 0.4- 0.7+: cuts 0.15 (3/4) and 0.55 (3/4); middle of the
    # two best candidates (index 0) -> 0.15; on fold 0: 0.9+, 0.8+ ok, 0.3- and 0.6- accepted -> 2/4
    # fold 1's threshold from fold 0: sorted 0.3- 0.6- 0.8+ 0.9+ -> 0.7 (4/4); on fold 1: 0.7+ ok (>=), 0.2+
    # wrong, 0.4- ok, 0.1- ok -> 3/4
    kf = ev.kfold_accuracy(scores, labels, n_folds=2)
    np.testing.assert_allclose(kf.thresholds, [0.15, 0.7])
    np.testing.assert_allclose(kf.fold_accuracies, [0.5, 0.75])
    assert kf.mean == pytest.approx(0.625) and kf.std == pytest.approx(0.125)
    # the same with explicit fold ids
    kf2 = ev.kfold_accuracy(scores, labels, folds=np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    np.testing.assert_allclose(kf2.fold_accuracies, kf.fold_accuracies)


def test_kfold_chance_on_random_scores():
    rng = np.random.default_rng(2)
    scores = rng.random(6000)
    labels = np.r_[np.ones(3000), np.zeros(3000)][rng.permutation(6000)]
    kf = ev.kfold_accuracy(scores, labels)
    assert abs(kf.mean - 0.5) < 0.03


def test_kfold_input_checks():
    with pytest.raises(ValueError):
        ev.kfold_accuracy([0.1, 0.2, 0.3], [1, 0, 1], n_folds=10)
    with pytest.raises(ValueError):
        ev.kfold_accuracy([0.1, 0.2], [1, 0], folds=np.array([0, 0]))


# ------------------------------------------------------------------------------------------------ report
def test_verification_report_from_embeddings():
    # two identities on orthogonal axes with small noise: perfectly verifiable
    rng = np.random.default_rng(0)
    cls = np.repeat([0, 1, 2], 30)
    centers = np.eye(3)
    emb = centers[cls] + 0.05 * rng.normal(size=(90, 3))
    ia, ib, same = ev.all_pairs(cls)
    rep = ev.verification_report(ev.pair_scores(emb[ia], emb[ib]), same)
    assert rep["accuracy"] == 1.0 and rep["accuracy_std"] == 0.0 and rep["auc"] == 1.0
    assert rep["tar_at_far"] == {1e-2: 1.0, 1e-3: 1.0, 1e-4: 1.0}
    assert rep["n_pos"] == 3 * 435 and rep["n_neg"] == 2700
    assert rep["far_reliable"] == {1e-2: True, 1e-3: True, 1e-4: False}
    fpr, tpr, thr = rep["roc"]
    assert fpr[0] == 0 and tpr[-1] == 1
