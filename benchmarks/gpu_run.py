"""caffelite against PyTorch on one GPU, side by side in one run: training images/s.

    python benchmarks/gpu_run.py [--nets lenet,alexnet,resnet50] [--precisions fp32,mixed]
                                 [--iters N] [--warmup N] [--gpu 0] [--json out.json]

Nets, from the model zoo's deploy files turned into training nets (an Input layer with a label,
the final Softmax replaced by SoftmaxWithLoss, BatchNorm on batch statistics, gaussian / MSRA
weights where the deploy file has no filler), at Caffe's usual batch sizes:

    LeNet (model_zoo/lenet, batch 64), AlexNet (model_zoo/bvlc_alexnet, batch 256),
    ResNet-50 (model_zoo/resnet50, batch 64)

Both frameworks run the same net with the same starting weights and the same inputs (random
images and labels, kept on the GPU: this measures the training step, not a data pipeline), and
the same step: forward, loss, backward, SGD with momentum 0.9. Precisions:

    fp32   float32 with TF32 tensor cores (caffelite: allow_tf32, its default; PyTorch:
           torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True)
    mixed  float16 compute, float32 master weights, dynamic loss scaling (caffelite:
           compute_dtype: float16; PyTorch: torch.autocast(float16) + GradScaler)

PyTorch runs eagerly (no torch.compile), cudnn.benchmark off, as caffelite (cuDNN heuristics,
no autotuning). The ratio printed is caffelite's images/s over PyTorch's (> 1: caffelite is
faster); the goal is >= 1.0 on each line. Without a GPU (or CuPy, or PyTorch with CUDA) the
runner says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

NETS = {  # name: (deploy file, batch, iterations timed)
    "lenet": (REPO / "model_zoo" / "lenet" / "deploy.yaml", 64, 200),
    "alexnet": (REPO / "model_zoo" / "bvlc_alexnet" / "deploy.yaml", 256, 20),
    "resnet50": (REPO / "model_zoo" / "resnet50" / "deploy.yaml", 64, 20),
}
PRECISIONS = ("fp32", "mixed")


def die(message: str) -> None:
    print(f"gpu_run: {message}", file=sys.stderr)
    sys.exit(2)


def check_environment(gpu: int):
    """CuPy with a GPU, and PyTorch with CUDA on the same machine; a clear exit otherwise."""
    from caffelite.backend import gpu_available

    if not gpu_available():
        die("no GPU: CuPy is not installed or no CUDA device is visible (this benchmark needs an "
            "NVIDIA GPU; pip install 'caffelite[gpu]')")
    try:
        import torch
    except ImportError:
        die("PyTorch is not installed: pip install torch (a CUDA build) to compare against it")
    if not torch.cuda.is_available():
        die("this PyTorch has no CUDA (or sees no GPU): install a CUDA build of torch")
    torch.cuda.set_device(gpu)
    return torch


# ---- the nets ----------------------------------------------------------------------------------
def training_net(deploy: Path, batch: int):
    """The deploy net as a training net at ``batch`` (module doc)."""
    from caffelite import config
    from caffelite.proto import pb

    param = config.load_net(deploy)
    data = param.layer[0]
    if data.type != "Input":
        raise SystemExit(f"{deploy}: the first layer must be an Input layer")
    data.input_param.shape[0].dim[0] = batch
    data.input_param.shape.add().dim.append(batch)
    data.top.append("label")
    last = param.layer[-1]
    if last.type != "Softmax":
        raise SystemExit(f"{deploy}: the last layer must be the Softmax")
    last.type, last.name = "SoftmaxWithLoss", "loss"
    last.bottom.append("label")
    del last.top[:]
    last.top.append("loss")
    for layer in param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.ClearField("use_global_stats")  # TRAIN: batch statistics
        if layer.type in ("Convolution", "InnerProduct"):
            p = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
            if not p.HasField("weight_filler"):
                p.weight_filler.CopyFrom(pb.FillerParameter(type="msra") if layer.type == "Convolution"
                                         else pb.FillerParameter(type="gaussian", std=0.01))
    return param


def inputs(param, seed: int = 7):
    shape = tuple(param.layer[0].input_param.shape[0].dim)
    classes = next(l.inner_product_param.num_output for l in reversed(param.layer) if l.type == "InnerProduct")
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, shape[0])


# ---- caffelite -------------------------------------------------------------------------------------
def caffelite_solver(param, precision: str, gpu: int):
    from caffelite.backend import Device
    from caffelite.proto import pb
    from caffelite.solvers.base import create_solver

    sp = pb.SolverParameter(type="SGD", base_lr=1e-3, momentum=0.9, lr_policy="fixed", max_iter=10 ** 9,
                            display=0, random_seed=1701, snapshot_after_train=False,
                            compute_dtype="float16" if precision == "mixed" else "float32",
                            allow_tf32=True)
    sp.net_param.CopyFrom(param)
    return create_solver(sp, device=Device.gpu(gpu))


def time_caffelite(param, precision, data, labels, gpu, warmup, iters):
    from caffelite.backend import cupy_module

    cp = cupy_module()
    solver = caffelite_solver(param, precision, gpu)
    try:
        solver.net.blobs["data"].set_data(data)  # the Input layer keeps them on the GPU
        solver.net.blobs["label"].set_data(labels.astype(np.float32))
        solver.step(1)
        first_loss = float(solver.loss)
        solver.step(warmup)
        cp.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        solver.step(iters)  # returns after reading the losses: the device is idle again
        cp.cuda.get_current_stream().synchronize()
        seconds = time.perf_counter() - start
        return first_loss, seconds
    finally:
        solver.close()
        del solver
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()


# ---- PyTorch: the same NetParameter, layer by layer -------------------------------------------------
def torch_net(torch, param, caffelite_net):
    """An nn.Module running ``param``'s layers in order on a blob dict; weights from caffelite_net."""
    from torch import nn
    import torch.nn.functional as F

    class Scale(nn.Module):
        def __init__(self, channels, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

        def forward(self, x):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = x * self.weight.view(shape)
            return y + self.bias.view(shape) if self.bias is not None else y

    class Flatten(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    class CaffeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = []
            self.mods = nn.ModuleDict()
            shapes = {name: blob.shape for name, blob in caffelite_net.blobs.items()}
            for lp in param.layer:
                if lp.type == "Input":
                    continue
                mod, kind = self._module(lp, shapes), lp.type
                if mod is not None:
                    self.mods[lp.name.replace(".", "_")] = mod
                self.steps.append((lp, mod, kind))

        def _module(self, lp, shapes):
            bshape = shapes[lp.bottom[0]]
            if lp.type == "Convolution":
                p = lp.convolution_param
                k = p.kernel_size[0] if len(p.kernel_size) else (p.kernel_h, p.kernel_w)
                s = p.stride[0] if len(p.stride) else 1
                pad = p.pad[0] if len(p.pad) else 0
                return nn.Conv2d(bshape[1], p.num_output, k, s, pad, groups=p.group, bias=p.bias_term)
            if lp.type == "InnerProduct":
                p = lp.inner_product_param
                return nn.Sequential(Flatten(), nn.Linear(math.prod(bshape[1:]), p.num_output, bias=p.bias_term))
            if lp.type == "BatchNorm":
                p = lp.batch_norm_param
                return nn.BatchNorm2d(bshape[1], eps=p.eps, momentum=1 - p.moving_average_fraction, affine=False)
            if lp.type == "Scale":
                return Scale(bshape[1], lp.scale_param.bias_term)
            if lp.type == "LRN":
                p = lp.lrn_param
                return nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k)
            if lp.type == "Dropout":
                return nn.Dropout(lp.dropout_param.dropout_ratio)
            return None

        def forward(self, blobs):
            for lp, mod, kind in self.steps:
                x = blobs[lp.bottom[0]] if lp.bottom else None
                if kind == "ReLU":
                    y = F.relu(x, inplace=lp.top[0] == lp.bottom[0])
                elif kind == "Pooling":
                    p = lp.pooling_param
                    if p.global_pooling:
                        y = F.adaptive_avg_pool2d(x, 1) if p.pool == 1 else F.adaptive_max_pool2d(x, 1)
                    else:
                        k = p.kernel_size or (p.kernel_h, p.kernel_w)
                        s = p.stride or 1
                        pool = F.max_pool2d if p.pool == 0 else F.avg_pool2d
                        y = pool(x, k, s, p.pad, ceil_mode=True)
                elif kind == "Eltwise":
                    y = blobs[lp.bottom[0]]
                    for name in lp.bottom[1:]:
                        y = y + blobs[name]
                elif kind == "Concat":
                    y = torch.cat([blobs[n] for n in lp.bottom], dim=lp.concat_param.axis)
                elif kind == "SoftmaxWithLoss":
                    return F.cross_entropy(x.float(), blobs[lp.bottom[1]])
                else:
                    y = mod(x)
                blobs[lp.top[0]] = y
            raise RuntimeError("the net has no SoftmaxWithLoss")

    model = CaffeNet()
    with torch.no_grad():
        for lp, mod, kind in model.steps:
            layer = caffelite_net.layer_by_name.get(lp.name)
            if mod is None or layer is None or not layer.blobs or kind == "BatchNorm":
                continue
            target = mod[1] if kind == "InnerProduct" else mod
            values = [torch.from_numpy(b.cpu_data().astype(np.float32)) for b in layer.blobs]
            target.weight.copy_(values[0].reshape(target.weight.shape))
            if getattr(target, "bias", None) is not None and len(values) > 1:
                target.bias.copy_(values[1].reshape(target.bias.shape))
    return model


def time_torch(torch, param, precision, data, labels, gpu, warmup, iters):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False
    from caffelite.layers.base import TRAIN
    from caffelite.net import Net

    # The caffelite solver's starting weights: its train net is this net with its seed (fillers
    # draw on the host, so a CPU net gets the same numbers; its activations are never allocated).
    reference = Net(param, phase=TRAIN, seed=1701)
    device = torch.device("cuda", gpu)
    model = torch_net(torch, param, reference).to(device).train()
    reference.close()
    x = torch.from_numpy(data).to(device)
    y = torch.from_numpy(labels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    mixed = precision == "mixed"
    scaler = torch.amp.GradScaler("cuda") if mixed else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=mixed):
            loss = model({"data": x, "label": y})
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    first_loss = step().item()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return first_loss, seconds  # the caller frees the model and PyTorch's cached memory


# ---- the run -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32, mixed")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default per net)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    precisions = [p for p in args.precisions.split(",") if p]
    for n in nets:
        if n not in NETS:
            die(f"unknown net '{n}' (known: {', '.join(NETS)})")
    for p in precisions:
        if p not in PRECISIONS:
            die(f"unknown precision '{p}' (known: {', '.join(PRECISIONS)})")

    torch = check_environment(args.gpu)
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(args.gpu)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    from caffelite.layers.cudnn_conv import cudnn_version

    print(f"GPU {args.gpu}: {name}; CuPy {cp.__version__}, cuDNN (caffelite) {cudnn_version() or 'none'}; "
          f"PyTorch {torch.__version__}, cuDNN (PyTorch) {torch.backends.cudnn.version()}")
    print(f"{'net':<10}{'batch':>6}{'precision':>10}{'caffelite img/s':>17}{'PyTorch img/s':>15}"
          f"{'ratio':>8}  first losses (caffelite / PyTorch)")
    results = []
    for net_name in nets:
        deploy, batch, default_iters = NETS[net_name]
        iters = args.iters or default_iters
        param = training_net(deploy, batch)
        data, labels = inputs(param)
        for precision in precisions:
            loss_c, sec_c = time_caffelite(param, precision, data, labels, args.gpu, args.warmup, iters)
            loss_t, sec_t = time_torch(torch, param, precision, data, labels, args.gpu, args.warmup, iters)
            gc.collect()
            torch.cuda.empty_cache()  # caffelite's next run gets the memory back
            ips_c, ips_t = batch * iters / sec_c, batch * iters / sec_t
            ratio = ips_c / ips_t
            agree = abs(loss_c - loss_t) <= 0.05 * max(abs(loss_t), 1.0)
            print(f"{net_name:<10}{batch:>6}{precision:>10}{ips_c:>17.1f}{ips_t:>15.1f}{ratio:>8.2f}  "
                  f"{loss_c:.4f} / {loss_t:.4f}{'' if agree else '  (DIFFER: check the net mapping)'}")
            results.append({"net": net_name, "batch": batch, "precision": precision, "iters": iters,
                            "caffelite_images_per_s": ips_c, "pytorch_images_per_s": ips_t,
                            "ratio": ratio, "first_loss_caffelite": loss_c, "first_loss_pytorch": loss_t})
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": name, "results": results}, indent=2))
    missed = [r for r in results if r["ratio"] < 1.0]
    print("goal (>= 1.0x PyTorch eager on each line): " +
          ("met" if not missed else "missed on " + ", ".join(f"{r['net']}/{r['precision']}" for r in missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
