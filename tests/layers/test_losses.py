"""MultinomialLogisticLoss, InfogainLoss, HingeLoss, SigmoidCrossEntropyLoss and
ContrastiveLoss against plain NumPy references (loops), with gradient checks."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError, DataError
from caffelite.io.blob_proto import array_to_blob_proto
from layer_testing import check_gradient, make_layer, run, setup


@pytest.fixture
def rs():
    return np.random.default_rng(7)


def probabilities(rs, shape):
    p = rs.uniform(0.1, 1.0, shape)
    return p / p.sum(axis=1, keepdims=True)


def backward_with_weight(layer, bottom, top, weight=1.0):
    top[0].set_diff(weight)
    layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
    return bottom[0].cpu_diff().copy()


# ---- MultinomialLogisticLoss -------------------------------------------------
def ref_multinomial(p, label):
    n = p.shape[0]
    flat = p.reshape(n, -1)
    total = 0.0
    for i in range(n):
        total -= math.log(max(flat[i, int(label.reshape(-1)[i])], 1e-20))
    return total / n


def test_multinomial_forward_backward(rs):
    p = probabilities(rs, (4, 5))
    label = np.array([0, 3, 4, 1.0])
    layer, bottom, top, (loss,) = run("MultinomialLogisticLoss", [p, label])
    np.testing.assert_allclose(loss, ref_multinomial(p, label), rtol=1e-12)
    diff = backward_with_weight(layer, bottom, top, 2.0)
    expected = np.zeros_like(p)
    for i, l in enumerate(label.astype(int)):
        expected[i, l] = -2.0 / 4 / p[i, l]
    np.testing.assert_allclose(diff, expected, rtol=1e-12)


def test_multinomial_clips_and_4d(rs):
    p = probabilities(rs, (3, 4, 1, 1))
    p[1, 2] = 0.0
    label = np.array([1, 2, 0.0]).reshape(3, 1, 1, 1)
    _, _, _, (loss,) = run("MultinomialLogisticLoss", [p, label])
    np.testing.assert_allclose(loss, ref_multinomial(p, label), rtol=1e-12)
    assert np.isfinite(loss)


def test_multinomial_gradient(rs):
    layer = make_layer("MultinomialLogisticLoss")
    bottom, top = setup(layer, [probabilities(rs, (4, 3)), np.array([2, 0, 1, 1.0])])
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_multinomial_label_errors(rs):
    with pytest.raises(DataError, match="outside"):
        run("MultinomialLogisticLoss", [probabilities(rs, (2, 3)), np.array([0, 3.0])])
    with pytest.raises(ConfigError, match="one label per item"):
        run("MultinomialLogisticLoss", [probabilities(rs, (2, 3)), np.zeros((2, 2))])
    layer, bottom, top, _ = run("MultinomialLogisticLoss", [probabilities(rs, (2, 3)), np.array([0, 1.0])])
    with pytest.raises(ConfigError, match="cannot backpropagate"):
        layer.backward(top, [True, True], bottom)


# ---- InfogainLoss --------------------------------------------------------------
def ref_infogain(x, label, H, axis=1, ignore=None, mode="VALID"):
    """Loops over (outer, inner) positions; softmax computed per position."""
    x = np.moveaxis(x, axis, -1)
    outer = int(np.prod(x.shape[:axis]))
    C = x.shape[-1]
    pos = x.reshape(-1, C)
    labels = label.reshape(-1)
    loss, count = 0.0, 0
    grad = np.zeros_like(pos)
    for k in range(pos.shape[0]):
        lab = int(labels[k])
        if ignore is not None and lab == ignore:
            continue
        e = np.exp(pos[k] - pos[k].max())
        p = e / e.sum()
        for c in range(C):
            loss -= H[lab, c] * math.log(max(p[c], 1e-20))
        grad[k] = p * H[lab].sum() - H[lab]
        count += 1
    norm = {"FULL": pos.shape[0], "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(norm, 1)
    grad = np.moveaxis(grad.reshape(x.shape), -1, axis) / norm
    return loss / norm, grad


def test_infogain_with_H_bottom(rs):
    x, label = rs.standard_normal((4, 3)), np.array([0, 2, 1, 2.0])
    H = rs.uniform(0, 1, (3, 3))
    layer, bottom, top, (loss, prob) = run("InfogainLoss", [x, label, H], num_top=2)
    ref_loss, ref_grad = ref_infogain(x, label, H)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(prob, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top, 3.0), 3 * ref_grad,
                               rtol=1e-10, atol=1e-14)
    # The prob top is a by-product without a backward (as in Caffe): check the loss alone.
    layer = make_layer("InfogainLoss")
    bottom, top = setup(layer, [x, label, H])
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_infogain_identity_is_softmax_loss(rs):
    x, label = rs.standard_normal((5, 4)), np.array([0, 3, 1, 2, 2.0])
    _, _, _, (loss,) = run("InfogainLoss", [x, label, np.eye(4)])
    _, _, _, (softmax_loss,) = run("SoftmaxWithLoss", [x, label])
    np.testing.assert_allclose(loss, softmax_loss, rtol=1e-12)


def test_infogain_from_source_file(rs, tmp_path):
    H = rs.uniform(0, 2, (3, 3)).astype(np.float32)
    path = tmp_path / "H.binaryproto"
    path.write_bytes(array_to_blob_proto(H.reshape(1, 1, 3, 3), legacy=True).SerializeToString())
    x, label = rs.standard_normal((4, 3)), np.array([1, 0, 2, 1.0])
    layer, bottom, top, (loss,) = run("InfogainLoss", [x, label],
                                      infogain_loss_param={"source": str(path)})
    np.testing.assert_allclose(loss, ref_infogain(x, label, H.astype(float))[0], rtol=1e-12)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_axis_ignore_and_normalization(rs, mode):
    # Scores (2, 3, 4) with the classes on axis 1: 2 x 4 positions.
    x = rs.standard_normal((2, 3, 4))
    label = np.array([[0, 2, -1, 1], [1, -1, 0, 2.0]])
    H = rs.uniform(0, 1, (3, 3))
    fields = {"loss_param": {"ignore_label": -1, "normalization": mode}}
    layer, bottom, top, (loss,) = run("InfogainLoss", [x, label, H], **fields)
    ref_loss, ref_grad = ref_infogain(x, label, H, ignore=-1, mode=mode)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top), ref_grad,
                               rtol=1e-10, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_infogain_last_axis_and_legacy_normalize(rs):
    x = rs.standard_normal((2, 4, 3))
    label = rs.integers(0, 3, (2, 4)).astype(float)
    H = rs.uniform(0, 1, (3, 3))
    layer, bottom, top, (loss,) = run("InfogainLoss", [x, label, H],
                                      infogain_loss_param={"axis": -1},
                                      loss_param={"normalize": False})
    ref_loss, ref_grad = ref_infogain(x, label, H, axis=2, mode="BATCH_SIZE")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top), ref_grad,
                               rtol=1e-10, atol=1e-14)


def test_infogain_errors(rs):
    x, label = rs.standard_normal((2, 3)), np.array([0, 1.0])
    with pytest.raises(ConfigError, match="infogain matrix"):
        run("InfogainLoss", [x, label])
    with pytest.raises(ConfigError, match="3x3"):
        run("InfogainLoss", [x, label, np.eye(2)])
    layer, bottom, top, _ = run("InfogainLoss", [x, label, np.eye(3)])
    with pytest.raises(ConfigError, match="cannot backpropagate to bottom 2"):
        layer.backward(top, [True, False, True], bottom)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(2)


# ---- HingeLoss -----------------------------------------------------------------
def ref_hinge(x, label, power):
    n = x.shape[0]
    flat = x.reshape(n, -1)
    loss = 0.0
    grad = np.zeros_like(flat)
    for i in range(n):
        for j in range(flat.shape[1]):
            t = 1.0 if j == int(label[i]) else -1.0
            m = max(0.0, 1.0 - t * flat[i, j])
            loss += m ** power
            grad[i, j] = -t * (np.sign(m) if power == 1 else 2 * m)
    return loss / n, grad.reshape(x.shape) / n


@pytest.mark.parametrize("norm,power", [("L1", 1), ("L2", 2)])
def test_hinge(rs, norm, power):
    x = rs.standard_normal((4, 5)) * 1.5
    label = np.array([0, 4, 2, 2.0])
    fields = {} if norm == "L1" else {"hinge_loss_param": {"norm": norm}}
    layer, bottom, top, (loss,) = run("HingeLoss", [x, label], **fields)
    ref_loss, ref_grad = ref_hinge(x, label, power)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top, 2.0), 2 * ref_grad,
                               rtol=1e-12)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_hinge_4d_scores(rs):
    x = rs.standard_normal((3, 2, 2, 1))
    label = np.array([3, 0, 1.0]).reshape(3, 1, 1, 1)
    _, _, _, (loss,) = run("HingeLoss", [x, label])
    np.testing.assert_allclose(loss, ref_hinge(x, label.reshape(-1), 1)[0], rtol=1e-12)


# ---- SigmoidCrossEntropyLoss -----------------------------------------------------
def ref_sigmoid_ce(x, t, ignore=None, mode="BATCH_SIZE"):
    flat_x, flat_t = x.reshape(-1), t.reshape(-1)
    loss, count = 0.0, 0
    grad = np.zeros_like(flat_x)
    for k, (xv, tv) in enumerate(zip(flat_x, flat_t)):
        if ignore is not None and int(tv) == ignore:
            continue
        p = 1 / (1 + math.exp(-xv))
        # -(t log p + (1 - t) log(1 - p)), in a form that stays finite.
        loss += -(tv * min(xv, 0) - tv * math.log1p(math.exp(-abs(xv))) +
                  (1 - tv) * (min(-xv, 0) - math.log1p(math.exp(-abs(xv)))))
        grad[k] = p - tv
        count += 1
    norm = {"FULL": x.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    norm = max(norm, 1)
    return loss / norm, grad.reshape(x.shape) / norm


def test_sigmoid_ce_default_batch_size(rs):
    x, t = rs.standard_normal((4, 3)) * 2, rs.uniform(0, 1, (4, 3))
    layer, bottom, top, (loss,) = run("SigmoidCrossEntropyLoss", [x, t])
    ref_loss, ref_grad = ref_sigmoid_ce(x, t)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top, 2.0), 2 * ref_grad,
                               rtol=1e-10, atol=1e-15)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_sigmoid_ce_ignore_label_and_modes(rs, mode):
    x = rs.standard_normal((3, 2, 2))
    t = rs.integers(0, 2, (3, 2, 2)).astype(float)
    t[0, 1, 0] = t[2, 0, 1] = -1
    fields = {"loss_param": {"ignore_label": -1, "normalization": mode}}
    layer, bottom, top, (loss,) = run("SigmoidCrossEntropyLoss", [x, t], **fields)
    ref_loss, ref_grad = ref_sigmoid_ce(x, t, ignore=-1, mode=mode)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(backward_with_weight(layer, bottom, top), ref_grad,
                               rtol=1e-10, atol=1e-15)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_sigmoid_ce_legacy_normalize_and_extremes():
    x = np.array([[-200.0, 200.0, 0.0, 30.0]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 0.5, 0.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        layer, bottom, top, (loss,) = run("SigmoidCrossEntropyLoss", [x, t], dtype=np.float32,
                                          loss_param={"normalize": True})
        diff = backward_with_weight(layer, bottom, top)
    assert loss.dtype == np.float32 and diff.dtype == np.float32
    np.testing.assert_allclose(loss, ref_sigmoid_ce(x.astype(float), t.astype(float),
                                                    mode="VALID")[0], rtol=1e-6)
    assert np.all(np.isfinite(diff))


def test_sigmoid_ce_count_mismatch(rs):
    with pytest.raises(ConfigError, match="same count"):
        run("SigmoidCrossEntropyLoss", [rs.standard_normal((2, 3)), rs.standard_normal((2, 2))])


# ---- ContrastiveLoss -------------------------------------------------------------
def ref_contrastive(a, b, y, margin=1.0, legacy=False):
    n = a.shape[0]
    loss = 0.0
    ga = np.zeros_like(a)
    for i in range(n):
        d = a[i] - b[i]
        dsq = float(d @ d)
        if int(y[i]):
            loss += dsq
            ga[i] = d / n
        elif legacy:
            loss += max(margin - dsq, 0.0)
            ga[i] = -d / n if margin - dsq > 0 else 0
        else:
            dist = math.sqrt(dsq)
            loss += max(margin - dist, 0.0) ** 2
            # Caffe's gradient: -(margin - d) / (d + 1e-4) (a - b) / N
            ga[i] = -(margin - dist) / (dist + 1e-4) * d / n if margin - dist > 0 else 0
    return loss / n / 2, ga


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive(rs, legacy):
    a, b = rs.standard_normal((6, 3)) * 0.4, rs.standard_normal((6, 3)) * 0.4
    y = np.array([1, 0, 0, 1, 0, 0.0])
    margin = 1.5 if legacy else 1.25
    fields = {"contrastive_loss_param": {"margin": margin, "legacy_version": legacy}}
    layer, bottom, top, (loss,) = run("ContrastiveLoss", [a, b, y], **fields)
    ref_loss, ref_ga = ref_contrastive(a, b, y, margin, legacy)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    top[0].set_diff(2.0)
    layer.backward(top, [True, True, False], bottom)
    np.testing.assert_allclose(bottom[0].cpu_diff(), 2 * ref_ga, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bottom[1].cpu_diff(), -2 * ref_ga, rtol=1e-12, atol=1e-15)
    # Caffe's 1e-4 in the non-legacy gradient costs about 1e-4 / d of relative accuracy.
    assert check_gradient(layer, bottom, top, check_bottom=[0, 1],
                          rtol=1e-4 if legacy else 2e-3) > 0


def test_contrastive_default_margin_and_far_pairs(rs):
    a = np.array([[0.0, 0.0], [0.0, 0.0], [0.1, 0.0]])
    b = np.array([[3.0, 0.0], [0.2, 0.0], [0.1, 0.0]])
    y = np.array([0, 0, 0.0]).reshape(3, 1, 1, 1)
    layer, bottom, top, (loss,) = run("ContrastiveLoss", [a, b, y])
    np.testing.assert_allclose(loss, ref_contrastive(a, b, y.reshape(-1))[0], rtol=1e-12)
    top[0].set_diff(1.0)
    layer.backward(top, [True, True, False], bottom)
    assert np.all(bottom[0].cpu_diff()[0] == 0)  # beyond the margin: no push
    assert np.all(np.isfinite(bottom[0].cpu_diff()))  # a == b stays finite


def test_contrastive_errors(rs):
    with pytest.raises(ConfigError, match="same shape"):
        run("ContrastiveLoss", [rs.standard_normal((2, 3)), rs.standard_normal((2, 4)),
                                np.ones(2)])
    with pytest.raises(ConfigError, match="one similarity flag per pair"):
        run("ContrastiveLoss", [rs.standard_normal((2, 3)), rs.standard_normal((2, 3)),
                                np.ones((2, 2))])
    layer = make_layer("ContrastiveLoss")
    assert layer.allow_force_backward(1) and not layer.allow_force_backward(2)
