"""Every computing layer type on every device: forward and backward on the device equal the CPU's
in float32 (``compare_devices``). On the CPU the test checks itself (the CPU against the CPU: the
case builds and runs); with CuPy and a GPU it is the GPU-against-CPU check of each layer.

Left out here, each checked elsewhere on the GPU: the data-reading layers (Data, HDF5Data,
ImageData, WindowData, MemoryData, Input, DummyData, HDF5Output) fill blobs from the host and
run in the GPU training tests; Dropout draws another random stream on the GPU (test_devices.py
checks its properties there); Python layers run the user's own code.
"""
import numpy as np
import pytest

from caffelite.registry import LAYERS
from layer_testing import compare_devices

R = np.random.default_rng(5)


def normal(*shape):
    return R.standard_normal(shape)


def positive(*shape):
    return R.uniform(0.5, 2.0, shape)


def labels(n, classes, *rest):
    return R.integers(0, classes, size=(n, 1, *rest)).astype(float)


FILL = {"weight_filler": {"type": "gaussian", "std": 0.3}, "bias_filler": {"type": "gaussian", "std": 0.2}}
CONV = {"num_output": 4, "kernel_size": [3], "pad": [1], "stride": [2], **FILL}
RECURRENT = {"num_output": 3, **FILL}

# id: (type, bottoms, options for compare_devices)
CASES = {
    "AbsVal": ("AbsVal", [normal(2, 3, 4)], {}),
    "Accuracy": ("Accuracy", [normal(6, 5), labels(6, 5)], {"check_bottom": [],
                                                           "accuracy_param": {"top_k": 2}}),
    "ArgMax": ("ArgMax", [normal(3, 6)], {"check_bottom": [], "argmax_param": {"top_k": 2}}),
    "BNLL": ("BNLL", [normal(2, 3, 4)], {}),
    "BatchReindex": ("BatchReindex", [normal(4, 3), np.array([2.0, 0.0, 2.0, 3.0, 1.0])],
                     {"check_bottom": [0]}),
    "Bias": ("Bias", [normal(2, 3, 4)], {"bias_param": {"axis": 1, "num_axes": 1,
                                                       "filler": {"type": "gaussian"}}}),
    "Bias-two-bottoms": ("Bias", [normal(2, 3, 4), normal(3)], {"bias_param": {"axis": 1}}),
    "Clip": ("Clip", [normal(2, 3, 4)], {"clip_param": {"min": -0.5, "max": 0.7}}),
    "Concat-axis0": ("Concat", [normal(1, 3), normal(2, 3)], {"concat_param": {"axis": 0}}),
    "ContrastiveLoss": ("ContrastiveLoss", [normal(4, 3), normal(4, 3),
                                            R.integers(0, 2, (4, 1, 1, 1)).astype(float)],
                        {"check_bottom": [0, 1]}),
    "Convolution-dilated": ("Convolution", [normal(2, 3, 9, 8)],
                            {"convolution_param": {**CONV, "dilation": [2]}}),
    "Crop": ("Crop", [normal(2, 3, 6, 5), normal(2, 3, 3, 3)],
             {"check_bottom": [0], "crop_param": {"axis": 2, "offset": [1, 2]}}),
    "Deconvolution": ("Deconvolution", [normal(2, 3, 4, 5)], {"convolution_param": CONV}),
    "ELU": ("ELU", [normal(2, 3, 4)], {"elu_param": {"alpha": 0.7}}),
    "Eltwise-SUM": ("Eltwise", [normal(2, 3), normal(2, 3)], {}),
    "Embed": ("Embed", [R.integers(0, 7, (5,)).astype(float)],
              {"check_bottom": [], "embed_param": {"num_output": 4, "input_dim": 7, **FILL}}),
    "EuclideanLoss": ("EuclideanLoss", [normal(3, 4), normal(3, 4)], {}),
    "Exp": ("Exp", [normal(2, 3)], {"exp_param": {"base": 2.0, "scale": 0.5, "shift": 0.1}}),
    "Filter": ("Filter", [normal(5, 3), np.array([1.0, 0.0, 1.0, 1.0, 0.0]).reshape(5, 1)],
               {"check_bottom": [0]}),
    "Flatten": ("Flatten", [normal(2, 3, 2, 2)], {}),
    "HingeLoss": ("HingeLoss", [normal(4, 5), labels(4, 5)], {"check_bottom": [0]}),
    "HingeLoss-L2": ("HingeLoss", [normal(4, 5), labels(4, 5)],
                     {"check_bottom": [0], "hinge_loss_param": {"norm": "L2"}}),
    "Im2col": ("Im2col", [normal(2, 3, 5, 5)], {"convolution_param": {"kernel_size": [3], "pad": [1]}}),
    "InfogainLoss": ("InfogainLoss", [positive(4, 3) / 3, labels(4, 3), positive(1, 1, 3, 3)],
                     {"check_bottom": [0]}),
    "InnerProduct-transpose": ("InnerProduct", [normal(3, 4)],
                               {"inner_product_param": {"num_output": 2, "transpose": True, **FILL}}),
    "LRN-within": ("LRN", [normal(2, 3, 5, 5)],
                   {"lrn_param": {"local_size": 3, "norm_region": "WITHIN_CHANNEL"}}),
    "LSTM": ("LSTM", [normal(3, 2, 4), np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])],
             {"check_bottom": [0], "recurrent_param": RECURRENT, "rtol": 1e-3, "atol": 1e-4}),
    "LSTMUnit": ("LSTMUnit", [normal(1, 2, 3), normal(1, 2, 12), np.array([[1.0, 0.0]])],
                 {"num_top": 2, "check_bottom": [0, 1]}),
    "Log": ("Log", [positive(2, 3)], {"log_param": {"base": 10.0, "scale": 2.0, "shift": 0.5}}),
    "MVN": ("MVN", [normal(2, 3, 4, 4)], {"rtol": 1e-3, "atol": 1e-4}),
    "MVN-across": ("MVN", [normal(2, 3, 4, 4)], {"mvn_param": {"across_channels": True},
                                                 "rtol": 1e-3, "atol": 1e-4}),
    "MultinomialLogisticLoss": ("MultinomialLogisticLoss", [positive(4, 3) / 3, labels(4, 3)],
                                {"check_bottom": [0]}),
    "PReLU": ("PReLU", [normal(2, 3, 4)], {}),
    "PReLU-shared": ("PReLU", [normal(2, 3, 4)], {"prelu_param": {"channel_shared": True}}),
    "Parameter": ("Parameter", [], {"parameter_param": {"shape": {"dim": [2, 3]}}}),
    "Pooling-STOCHASTIC-test": ("Pooling", [positive(2, 3, 6, 6)],
                                {"check_bottom": [],
                                 "pooling_param": {"pool": "STOCHASTIC", "kernel_size": 2, "stride": 2}}),
    "Pooling-global-pad": ("Pooling", [normal(2, 3, 5, 5)],
                           {"pooling_param": {"pool": "AVE", "kernel_size": 3, "stride": 2, "pad": 1}}),
    "Power": ("Power", [positive(2, 3)], {"power_param": {"power": 1.5, "scale": 0.7, "shift": 0.2}}),
    "RNN": ("RNN", [normal(3, 2, 4), np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])],
            {"check_bottom": [0], "recurrent_param": RECURRENT, "rtol": 1e-3, "atol": 1e-4}),
    "Reduction-SUMSQ": ("Reduction", [normal(2, 3, 4)], {"reduction_param": {"operation": "SUMSQ", "axis": 1}}),
    "Reduction-ASUM": ("Reduction", [normal(2, 3, 4)], {"reduction_param": {"operation": "ASUM"}}),
    "Reduction-MEAN": ("Reduction", [normal(2, 3, 4)], {"reduction_param": {"operation": "MEAN", "coeff": 2}}),
    "Reshape": ("Reshape", [normal(2, 3, 4)], {"reshape_param": {"shape": {"dim": [0, -1]}}}),
    "SPP": ("SPP", [normal(2, 3, 8, 8)], {"spp_param": {"pyramid_height": 3}}),
    "Scale": ("Scale", [normal(2, 3, 4)], {"scale_param": {"axis": 1, "bias_term": True,
                                                         "filler": {"type": "gaussian"}}}),
    "Scale-two-bottoms": ("Scale", [normal(2, 3, 4), normal(2, 3)], {"scale_param": {"axis": 0}}),
    "Sigmoid": ("Sigmoid", [normal(2, 3, 4)], {}),
    "SigmoidCrossEntropyLoss": ("SigmoidCrossEntropyLoss", [normal(4, 3), R.integers(0, 2, (4, 3)).astype(float)],
                                {"check_bottom": [0]}),
    "Silence": ("Silence", [normal(2, 3)], {"num_top": 0}),
    "Slice": ("Slice", [normal(2, 5, 3)], {"num_top": 2, "slice_param": {"axis": 1, "slice_point": [2]}}),
    "Softmax-axis2": ("Softmax", [normal(2, 3, 4)], {"softmax_param": {"axis": 2}}),
    "Split": ("Split", [normal(2, 3)], {"num_top": 3}),
    "Swish": ("Swish", [normal(2, 3, 4)], {"swish_param": {"beta": 1.5}}),
    "TanH": ("TanH", [normal(2, 3, 4)], {}),
    "Threshold": ("Threshold", [normal(2, 3, 4)], {"check_bottom": [], "threshold_param": {"threshold": 0.2}}),
    "Tile": ("Tile", [normal(2, 3, 2)], {"tile_param": {"axis": 1, "tiles": 3}}),
}

NOT_HERE = {"Data", "HDF5Data", "ImageData", "WindowData", "MemoryData", "Input", "DummyData",
            "HDF5Output", "Dropout", "Python"}
# checked case by case in test_devices.py
ELSEWHERE = {"BatchNorm", "Convolution", "Eltwise", "Concat", "InnerProduct", "LRN", "Pooling", "ReLU",
             "Softmax", "SoftmaxWithLoss"}


def test_every_computing_layer_has_a_device_case():
    builtin = {name for name in LAYERS.names() if LAYERS.get(name).__module__.startswith("caffelite.")}
    covered = {type for type, _, _ in CASES.values()} | ELSEWHERE | NOT_HERE
    assert builtin <= covered, sorted(builtin - covered)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_on_device_equals_cpu(case, device):
    type, bottoms, options = CASES[case]
    compare_devices(type, bottoms, device, **options)
