"""Softmax and SoftmaxWithLoss against plain NumPy references."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError, DataError
from layer_testing import check_gradient, forward, make_layer, run, setup

FLT_MIN = 1.17549435e-38


def ref_softmax(x, axis):
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        e = np.exp(x[idx] - x[idx].max())
        out[idx] = e / e.sum()
    return np.moveaxis(out, -1, axis)


def ref_softmax_loss(scores, labels, axis=1, ignore=None, mode="VALID"):
    """Loss and d loss / d scores (loss weight 1), one position at a time."""
    prob = ref_softmax(scores, axis)
    p = np.moveaxis(prob, axis, -1)
    outer = int(np.prod(scores.shape[:axis]))
    inner = int(np.prod(scores.shape[axis + 1:]))
    C = scores.shape[axis]
    p = p.reshape(outer, inner, C)
    lab = np.asarray(labels).reshape(outer, inner)
    grad = p.copy()
    loss, valid = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            k = int(lab[i, j])
            if ignore is not None and k == ignore:
                grad[i, j] = 0
                continue
            loss -= math.log(max(p[i, j, k], FLT_MIN))
            grad[i, j, k] -= 1
            valid += 1
    norm = {"FULL": outer * inner, "VALID": valid if ignore is not None else outer * inner,
            "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1, norm)
    moved = list(scores.shape[:axis]) + list(scores.shape[axis + 1:]) + [C]
    grad = np.moveaxis(grad.reshape(moved), -1, axis) / norm
    return loss / norm, grad, prob


@pytest.fixture
def rs():
    return np.random.default_rng(5)


# ---- Softmax ------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_forward(rs, axis, device):
    x = rs.standard_normal((2, 3, 4, 5)) * 3
    _, _, _, (y,) = run("Softmax", [x], softmax_param={"axis": axis}, device=device)
    np.testing.assert_allclose(y, ref_softmax(x, axis), rtol=1e-12, atol=1e-15)


def test_softmax_large_values_are_stable():
    x = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1000.0, -1000.0]])
    _, _, _, (y,) = run("Softmax", [x])
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref_softmax(x - x.max(1, keepdims=True), 1), rtol=1e-12)


def test_softmax_keeps_float32(rs):
    x = rs.standard_normal((2, 4)).astype(np.float32)
    layer, bottom, top, (y,) = run("Softmax", [x], dtype=np.float32)
    assert y.dtype == np.float32 and top[0].data.dtype == np.float32
    np.testing.assert_allclose(y, ref_softmax(x, 1), rtol=1e-5)


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_gradient(rs, axis):
    layer = make_layer("Softmax", softmax_param={"axis": axis})
    bottom, top = setup(layer, [rs.standard_normal((2, 3, 4))])
    assert check_gradient(layer, bottom, top) > 0


def test_softmax_in_place(rs):
    x = rs.standard_normal((2, 3, 2))
    dy = rs.standard_normal(x.shape)
    # Out of place: the reference backward.
    layer, bottom, top, (y,) = run("Softmax", [x])
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    expected_dx = bottom[0].cpu_diff().copy()
    # In place: top is the bottom blob.
    layer2 = make_layer("Softmax")
    b2, _ = setup(layer2, [x])
    forward(layer2, b2, b2)
    np.testing.assert_allclose(b2[0].cpu_data(), y, rtol=1e-12)
    b2[0].set_diff(dy)
    layer2.backward(b2, [True], b2)
    np.testing.assert_allclose(b2[0].cpu_diff(), expected_dx, rtol=1e-12, atol=1e-15)


# ---- SoftmaxWithLoss ----------------------------------------------------------
def spatial_case(rs, C=4):
    scores = rs.standard_normal((2, C, 3, 2)) * 2
    labels = rs.integers(0, C, size=(2, 1, 3, 2)).astype(np.float64)
    return scores, labels


def run_loss(scores, labels, num_top=1, weight=1.0, **fields):
    """SoftmaxWithLoss forward and backward (``device=`` among ``fields`` runs it there)."""
    layer, bottom, top, outs = run("SoftmaxWithLoss", [scores, labels], num_top=num_top, **fields)
    top[0].set_diff(weight)  # as the Net does before backward
    layer.backward(top, [True, False], bottom)
    return layer, bottom, top, outs, bottom[0].cpu_diff().copy()


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_modes(rs, mode, ignore, device):
    scores, labels = spatial_case(rs)
    labels.reshape(-1)[:3] = 2  # make sure some positions are ignored
    loss_param = {"normalization": mode}
    if ignore is not None:
        loss_param["ignore_label"] = ignore
    _, _, _, (loss,), grad = run_loss(scores, labels, loss_param=loss_param, device=device)
    ref_loss, ref_grad, _ = ref_softmax_loss(scores, labels, ignore=ignore, mode=mode)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_softmax_loss_default_is_valid(rs):
    scores, labels = spatial_case(rs)
    labels.reshape(-1)[:5] = 1
    _, _, _, (loss,), _ = run_loss(scores, labels, loss_param={"ignore_label": 1})
    ref_loss, _, _ = ref_softmax_loss(scores, labels, ignore=1, mode="VALID")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)


@pytest.mark.parametrize("normalize,mode", [(True, "VALID"), (False, "BATCH_SIZE")])
def test_softmax_loss_legacy_normalize(rs, normalize, mode):
    scores, labels = spatial_case(rs)
    labels.reshape(-1)[:4] = 0
    _, _, _, (loss,), grad = run_loss(scores, labels, loss_param={
        "normalize": normalize, "ignore_label": 0})
    ref_loss, ref_grad, _ = ref_softmax_loss(scores, labels, ignore=0, mode=mode)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_loss_explicit_normalization_beats_normalize(rs, normalize):
    # caffe.proto: normalize is "Ignored if normalization is specified".
    scores, labels = spatial_case(rs)
    labels.reshape(-1)[:4] = 0
    _, _, _, (loss,), grad = run_loss(scores, labels, loss_param={
        "normalize": normalize, "normalization": "NONE", "ignore_label": 0})
    ref_loss, ref_grad, _ = ref_softmax_loss(scores, labels, ignore=0, mode="NONE")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_get_normalization_default():
    from caffelite.layers.loss_norm import BATCH_SIZE, VALID, get_normalization
    from caffelite.proto import pb
    assert get_normalization(pb.LossParameter()) == VALID
    assert get_normalization(pb.LossParameter(), BATCH_SIZE) == BATCH_SIZE
    assert get_normalization(pb.LossParameter(normalize=True), BATCH_SIZE) == VALID


def test_softmax_loss_all_ignored_normaliser_floored(rs):
    scores = rs.standard_normal((3, 4))
    labels = np.full(3, 7.0)
    _, _, _, (loss,), grad = run_loss(scores, labels, loss_param={"ignore_label": 7})
    assert loss == 0.0 and not grad.any()


def test_softmax_loss_vector_labels_and_prob_top(rs):
    scores = rs.standard_normal((5, 3)) * 4
    labels = rs.integers(0, 3, size=5).astype(np.float64)
    layer, bottom, top, (loss, prob), grad = run_loss(scores, labels, num_top=2)
    ref_loss, ref_grad, ref_prob = ref_softmax_loss(scores, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert top[1].shape == scores.shape


def test_softmax_loss_axis_2(rs):
    scores = rs.standard_normal((2, 3, 4))
    labels = rs.integers(0, 4, size=(2, 3)).astype(np.float64)
    _, _, _, (loss,), grad = run_loss(scores, labels, softmax_param={"axis": 2})
    ref_loss, ref_grad, _ = ref_softmax_loss(scores, labels, axis=2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_softmax_loss_weight_scales_gradient(rs):
    scores, labels = spatial_case(rs)
    *_, grad1 = run_loss(scores, labels)
    *_, grad2 = run_loss(scores, labels, weight=2.0)
    _, ref_grad, _ = ref_softmax_loss(scores, labels)
    np.testing.assert_allclose(grad1, ref_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad2, 2 * ref_grad, rtol=1e-10, atol=1e-14)


def test_softmax_loss_clips_at_flt_min():
    scores = np.array([[0.0, -1e4]])
    _, _, _, (loss,) = run("SoftmaxWithLoss", [scores, np.array([1.0])])
    np.testing.assert_allclose(loss, -math.log(FLT_MIN), rtol=1e-12)


def test_softmax_loss_float32(rs):
    scores, labels = spatial_case(rs)
    layer, bottom, top, (loss,) = run("SoftmaxWithLoss", [scores.astype(np.float32), labels],
                                      dtype=np.float32)
    assert loss.dtype == np.float32
    top[0].set_diff(1.0)
    layer.backward(top, [True, False], bottom)
    assert bottom[0].diff.dtype == np.float32
    ref_loss, ref_grad, _ = ref_softmax_loss(scores.astype(np.float32), labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(bottom[0].cpu_diff(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_param", [{}, {"ignore_label": 1, "normalization": "FULL"},
                                        {"normalization": "BATCH_SIZE"}])
def test_softmax_loss_gradient(rs, loss_param):
    scores, labels = spatial_case(rs)
    layer = make_layer("SoftmaxWithLoss", loss_param=loss_param)
    bottom, top = setup(layer, [scores, labels])
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_softmax_loss_label_count_mismatch(rs):
    with pytest.raises(ConfigError, match="label"):
        run("SoftmaxWithLoss", [rs.standard_normal((2, 3, 2, 2)), np.zeros((2, 1, 2, 1))])


@pytest.mark.parametrize("bad", [3.0, -1.0])
def test_softmax_loss_label_out_of_range(rs, bad):
    labels = np.array([0.0, bad])
    with pytest.raises(DataError) as info:
        run("SoftmaxWithLoss", [rs.standard_normal((2, 3)), labels], name="myloss")
    assert "myloss" in str(info.value) and str(int(bad)) in str(info.value)


def test_softmax_loss_ignore_label_may_be_out_of_range(rs):
    scores = rs.standard_normal((3, 3))
    labels = np.array([0.0, 255.0, 2.0])
    _, _, _, (loss,), grad = run_loss(scores, labels, loss_param={"ignore_label": 255})
    ref_loss, ref_grad, _ = ref_softmax_loss(scores, labels, ignore=255)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_softmax_loss_label_gets_no_forced_backward():
    layer = make_layer("SoftmaxWithLoss")
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
