"""Mixed precision on a GPU with no host round trip: the overflow check, the update of the
float32 master weights and the dynamic loss scale, all on the device.

The per-parameter path (solvers/mixed_precision.py) reads "are all gradients finite?" on the
host every iteration, which stops the GPU and keeps a step from being recorded as a CUDA graph.
Here the scale and the loss-scaler's counters live in a small device array, and three kernels
do an iteration's work over the flat arenas of solvers/flat_update.py (the compute-dtype
parameters and gradients share the master arenas' offsets)::

    check_finite   overflow = 1 if any scaled gradient is Inf or NaN
    mixed_update   unless overflow: g = grad / S / iter_size + decay * W  (float32), the SGD or
                   Nesterov step on the master W and history, diff = step, and the net's copy
                   W_net = (T) W; elements with lr_mult 0 (frozen, BatchNorm statistics, the
                   arena's gaps) are left alone
    scaler_step    one thread: count an overflow (and its iteration) and halve S, or count a
                   clean iteration and double S after ``window`` of them (up to ``max_scale``);
                   then clear the overflow flag for the next iteration

The device state (float64): ``[S, clean iterations, overflows so far, first overflow iteration
not yet reported (-1: none), last overflow iteration]``; the solver reads it when it reads the
losses (mixed_precision.py ``MasterWeights.report``). ``seed_loss_diff`` starts a loss top's
diff at ``weight * S`` reading S from the device, so a recorded graph follows the scale.
"""
from __future__ import annotations

import numpy as np

from . import BLOCK, blocks, compiled

SOURCE = r"""
extern "C" __global__ void check_finite(const T* grad, long long n, int* overflow) {
    FOR_EACH(long long, i, n) {
        if (!isfinite((float)ld(grad[i]))) { *overflow = 1; return; }
    }
}

extern "C" __global__ void mixed_update(
        const int* overflow, const double* state, const float* rate, float momentum, float norm,
        int nesterov, const float* lr_mult, const float* decay, const T* grad,
        float* w, float* history, float* diff, T* w_net, long long n) {
    if (*overflow) return;
    const float unscale = (float)(1.0 / state[0]) * norm;
    const float r = rate[0];
    FOR_EACH(long long, i, n) {
        const float lr = lr_mult[i];
        if (lr == 0.f) continue;
        const float wi = w[i];
        const float g = (float)ld(grad[i]) * unscale + decay[i] * wi;
        const float previous = history[i];
        const float v = momentum * previous + (r * lr) * g;
        const float step = nesterov ? (1.f + momentum) * v - momentum * previous : v;
        history[i] = v;
        diff[i] = step;
        const float updated = wi - step;
        w[i] = updated;
        w_net[i] = st(updated);
    }
}

extern "C" __global__ void scaler_step(int* overflow, double* state, const double* iteration,
                                       int dynamic, int window, double max_scale) {
    if (*overflow) {
        state[2] += 1.0;
        if (state[3] < 0.0) state[3] = iteration[0];
        state[4] = iteration[0];
        if (dynamic) { state[0] *= 0.5; state[1] = 0.0; }
    } else if (dynamic) {
        state[1] += 1.0;
        if (state[1] >= window) {
            state[1] = 0.0;
            if (state[0] * 2.0 <= max_scale) state[0] *= 2.0;
        }
    }
    *overflow = 0;
}

extern "C" __global__ void seed_loss_diff(T* diff, long long n, const double* state, float weight) {
    const T value = st((acc_t)(weight * state[0]));
    FOR_EACH(long long, i, n)
        diff[i] = value;
}
"""

#: Indices into the device state (module doc).
SCALE, CLEAN, OVERFLOWS, FIRST, LAST = range(5)


def new_state(xp, scale: float, clean: int):
    """The device state of a loss scaler at scale ``scale`` with ``clean`` clean iterations."""
    return xp.asarray([scale, clean, 0, -1, -1], dtype=np.float64)


def check_finite(grad, overflow) -> None:
    n = grad.size
    compiled(SOURCE, "check_finite", grad.dtype)((blocks(n),), (BLOCK,), (grad, np.int64(n), overflow))


def mixed_update(*, overflow, state, rate, momentum: float, norm: float, nesterov: bool,
                 lr_mult, decay, grad, w, history, diff, w_net) -> None:
    n = w.size
    compiled(SOURCE, "mixed_update", w_net.dtype)(
        (blocks(n),), (BLOCK,),
        (overflow, state, rate, np.float32(momentum), np.float32(norm), np.int32(nesterov),
         lr_mult, decay, grad, w, history, diff, w_net, np.int64(n)))


def scaler_step(overflow, state, iteration, *, dynamic: bool, window: int, max_scale: float) -> None:
    compiled(SOURCE, "scaler_step", np.float32)(
        (1,), (1,), (overflow, state, iteration, np.int32(dynamic), np.int32(window), np.float64(max_scale)))


def seed_loss_diff(diff, state, weight: float) -> None:
    """diff[...] = weight * S, with S = state[0] read on the device."""
    n = diff.size
    compiled(SOURCE, "seed_loss_diff", diff.dtype)((blocks(n),), (BLOCK,),
                                                    (diff, np.int64(n), state, np.float32(weight)))


__all__ = ["SCALE", "CLEAN", "OVERFLOWS", "FIRST", "LAST", "new_state", "check_finite",
           "mixed_update", "scaler_step", "seed_loss_diff"]
