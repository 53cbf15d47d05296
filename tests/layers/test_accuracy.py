"""Accuracy against a plain NumPy reference (Caffe's counting rule)."""
import numpy as np
import pytest

from caffelite.errors import ConfigError, DataError
from layer_testing import make_layer, run, setup


def ref_accuracy(scores, labels, top_k=1, axis=1, ignore=None):
    s = np.moveaxis(scores, axis, -1)
    C = s.shape[-1]
    s = s.reshape(-1, C)
    lab = np.asarray(labels).reshape(-1).astype(int)
    correct = count = 0
    per_hit, per_num = np.zeros(C), np.zeros(C)
    for row, k in zip(s, lab):
        if ignore is not None and k == ignore:
            continue
        higher = sum(1 for v in row if v > row[k])
        ok = higher < top_k
        correct += ok
        count += 1
        per_num[k] += 1
        per_hit[k] += ok
    acc = correct / count if count else 0.0
    per = np.where(per_num > 0, per_hit / np.maximum(per_num, 1), 0.0)
    return acc, per


@pytest.fixture
def rs():
    return np.random.default_rng(11)


@pytest.mark.parametrize("top_k", [1, 3])
def test_accuracy_top_k(rs, top_k):
    scores = rs.standard_normal((20, 6))
    labels = rs.integers(0, 6, size=20).astype(np.float64)
    _, _, _, (acc, per) = run("Accuracy", [scores, labels], num_top=2,
                               accuracy_param={"top_k": top_k})
    ref, ref_per = ref_accuracy(scores, labels, top_k)
    assert acc.shape == () and per.shape == (6,)
    np.testing.assert_allclose(acc, ref, rtol=1e-12)
    np.testing.assert_allclose(per, ref_per, rtol=1e-12)
    assert 0 < ref < 1


def test_accuracy_ties_count_in_favour():
    # Row 0: label 1 ties the maximum -> correct at top 1.
    # Row 1: label 2 has three strictly higher scores -> wrong at top 3, right at top 4.
    # Row 2: all equal -> correct.
    scores = np.array([[1.0, 5.0, 5.0, 0.0],
                       [4.0, 3.0, 1.0, 2.0],
                       [2.0, 2.0, 2.0, 2.0]])
    labels = np.array([1.0, 2.0, 3.0])
    for top_k, expected in ((1, 2 / 3), (3, 2 / 3), (4, 1.0)):
        _, _, _, (acc,) = run("Accuracy", [scores, labels], accuracy_param={"top_k": top_k})
        np.testing.assert_allclose(acc, expected, rtol=1e-12)
        np.testing.assert_allclose(acc, ref_accuracy(scores, labels, top_k)[0], rtol=1e-12)


def test_accuracy_ignore_label_and_empty_class(rs):
    scores = rs.standard_normal((2, 5, 3, 3))
    labels = rs.integers(0, 4, size=(2, 1, 3, 3)).astype(np.float64)  # class 4 never occurs
    labels.reshape(-1)[::3] = 1
    _, _, _, (acc, per) = run("Accuracy", [scores, labels], num_top=2,
                               accuracy_param={"ignore_label": 1, "top_k": 2})
    ref, ref_per = ref_accuracy(scores, labels, 2, ignore=1)
    np.testing.assert_allclose(acc, ref, rtol=1e-12)
    np.testing.assert_allclose(per, ref_per, rtol=1e-12)
    assert per[1] == 0 and per[4] == 0


def test_accuracy_ignored_label_outside_range(rs):
    scores = rs.standard_normal((4, 3))
    labels = np.array([0.0, -1.0, 2.0, -1.0])
    _, _, _, (acc,) = run("Accuracy", [scores, labels], accuracy_param={"ignore_label": -1})
    np.testing.assert_allclose(acc, ref_accuracy(scores, labels, ignore=-1)[0], rtol=1e-12)


def test_accuracy_everything_ignored_is_zero(rs):
    _, _, _, (acc, per) = run("Accuracy", [rs.standard_normal((3, 2)), np.zeros(3)], num_top=2,
                               accuracy_param={"ignore_label": 0})
    assert acc == 0 and not per.any()


def test_accuracy_axis_2(rs):
    scores = rs.standard_normal((3, 4, 5))
    labels = rs.integers(0, 5, size=(3, 4)).astype(np.float64)
    _, _, _, (acc, per) = run("Accuracy", [scores, labels], num_top=2,
                               accuracy_param={"axis": 2, "top_k": 2})
    ref, ref_per = ref_accuracy(scores, labels, 2, axis=2)
    np.testing.assert_allclose(acc, ref, rtol=1e-12)
    np.testing.assert_allclose(per, ref_per, rtol=1e-12)


def test_accuracy_float32(rs):
    scores = rs.standard_normal((10, 4)).astype(np.float32)
    labels = rs.integers(0, 4, size=10).astype(np.float32)
    _, _, top, (acc,) = run("Accuracy", [scores, labels], dtype=np.float32)
    assert acc.dtype == np.float32
    np.testing.assert_allclose(acc, ref_accuracy(scores, labels)[0], rtol=1e-6)


def test_accuracy_errors(rs):
    with pytest.raises(ConfigError, match="top_k"):
        run("Accuracy", [rs.standard_normal((2, 3)), np.zeros(2)], accuracy_param={"top_k": 4})
    with pytest.raises(ConfigError, match="label"):
        run("Accuracy", [rs.standard_normal((2, 3)), np.zeros(3)])
    with pytest.raises(DataError, match="label 3"):
        run("Accuracy", [rs.standard_normal((2, 3)), np.array([0.0, 3.0])])


def test_accuracy_has_no_gradient(rs):
    layer = make_layer("Accuracy")
    bottom, top = setup(layer, [rs.standard_normal((2, 3)), np.zeros(2)])
    bottom[0].set_diff(7.0)
    layer.backward(top, [True, False], bottom)  # must not raise; zero gradient
    assert not bottom[0].cpu_diff().any()
    assert not layer.allow_force_backward(0) and not layer.allow_force_backward(1)
