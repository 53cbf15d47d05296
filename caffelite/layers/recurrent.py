"""RNN and LSTM over T time steps of N independent streams.

Bottoms: x (T, N, ...) (the inputs of step t flattened to I values), cont
(T, N) sequence-continuation flags, optionally a static input x_static (N, ...)
(flattened to S values) seen at every step, and with
``recurrent_param.expose_hidden`` the initial state h0 (1, N, H) (LSTM: then
c0 (1, N, H)). Tops: the outputs (T, N, H), and with expose_hidden the final
state hT (LSTM: then cT), each (1, N, H). H = ``num_output``.

cont_t = 0 starts a new sequence: the state carried into step t is zeroed.
Without expose_hidden the final state of one forward pass is the initial state
of the next (Caffe's behaviour; a batch starting with cont = 0 is unaffected);
``reset()`` zeroes it.

RNN (parameters in Caffe's order W_xh (H, I), b_h (H), [W_xh_static (H, S)],
W_hh (H, H), W_ho (H, H), b_o (H))::

    h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])
    o_t = tanh(W_ho h_t + b_o)              top: o

LSTM (W_xc (4H, I), b_c (4H), [W_xc_static (4H, S)], W_hc (4H, H); gates in
the order i, f, o, g, as lstm_unit.py)::

    gates_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static]
    c_t, h_t = LSTMUnit(c_{t-1}, gates_t, cont_t)      top: h

Caffe builds an unrolled net of InnerProduct/Eltwise/LSTMUnit layers; here the
input projections of all T steps are one GEMM, the steps loop in Python with one
(N, H) x (H, kH) GEMM each, and backward is backpropagation through time with
the weight gradients gathered in one GEMM per parameter. The parameter blobs
have Caffe's order and shapes, so Caffe's caffemodels load unchanged.
Deviation from Caffe: with expose_hidden, gradients also flow from the hT/cT
tops and into the h0/c0 bottoms (Caffe shares only their data, so it drops
those gradients).
"""
from __future__ import annotations

from ..fillers import fill
from ..registry import register_layer
from .base import Layer, check_not_in_place
from .lstm_unit import lstm_unit_backward, lstm_unit_forward


class RecurrentLayer(Layer):
    """What RNN and LSTM share: bottoms/tops layout, input projections, state."""

    num_bottom = (2, 5)
    num_top = (1, 3)
    param_name = "recurrent_param"
    #: Recurrent state blobs (h; LSTM: h, c) and gate blocks per hidden unit.
    state_names: tuple = ("h",)
    gates: int = 1

    # ---- set-up ------------------------------------------------------------
    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        if p.num_output <= 0:
            raise self.error("num_output must be positive",
                             hint="add recurrent_param { num_output: ... }")
        self.H = int(p.num_output)
        self.expose_hidden = p.expose_hidden
        n_state = len(self.state_names)
        exposed = n_state if self.expose_hidden else 0
        if len(bottom) not in (2 + exposed, 3 + exposed):
            states = ", ".join(f"{s}0" for s in self.state_names)
            raise self.error(
                f"takes {2 + exposed} or {3 + exposed} bottoms, got {len(bottom)}",
                hint="bottoms are x, cont, optional x_static"
                     + (f", then {states} (expose_hidden)" if exposed else ""))
        if len(top) != 1 + exposed:
            raise self.error(f"takes {1 + exposed} top(s), got {len(top)}",
                             hint="one output top" + (", then the final " + ", ".join(
                                 f"{s}T" for s in self.state_names) if exposed else ""))
        self.static_input = len(bottom) == 3 + exposed
        x = bottom[0]
        if x.num_axes < 2:
            raise self.error(f"bottom 0 must have at least 2 axes (T, N, ...), got {x.shape}",
                             hint="x is (time steps, streams, features...)")
        self.I = x.count_range(2)
        if self.static_input:
            xs = bottom[2]
            if xs.num_axes < 1 or xs.shape[0] != x.shape[1]:
                raise self.error(f"the static input {xs.shape} must be (N, ...) with "
                                 f"N = {x.shape[1]} streams", hint="x_static is (N, features...)")
            self.S = xs.count_range(1)
        G = self.gates * self.H
        shapes = [("W_x", (G, self.I)), ("b", (G,))]
        if self.static_input:
            shapes.append(("W_x_static", (G, self.S)))
        shapes += self.recurrent_param_shapes()
        self.blobs = []
        for suffix, shape in shapes:
            blob = self.make_blob(shape, f"{self.name}_{self.param_names[suffix]}")
            fill(blob, p.bias_filler if len(shape) == 1 else p.weight_filler, self.rng)
            self.blobs.append(blob)
        self._shape_key = None

    def recurrent_param_shapes(self) -> list:
        raise NotImplementedError

    def reshape(self, bottom, top):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self.error(f"bottom 0 must have at least 2 axes (T, N, ...), got {x.shape}",
                             hint="x is (time steps, streams, features...)")
        T, N = x.shape[:2]
        if cont.shape != (T, N):
            raise self.error(f"cont must be (T, N) = ({T}, {N}), got {cont.shape}",
                             hint="one sequence-continuation flag per time step and stream")
        if x.count_range(2) != self.I:
            raise self.error(f"each step of x has {x.count_range(2)} values, the weights were "
                             f"set up for {self.I}", hint="the input size cannot change")
        if self.static_input and (bottom[2].shape[0] != N or bottom[2].count_range(1) != self.S):
            raise self.error(f"x_static {bottom[2].shape} must be ({N}, ...) with {self.S} "
                             f"values per stream", hint="x_static is (N, features...)")
        offset = 2 + self.static_input
        for k, name in enumerate(self.state_names if self.expose_hidden else ()):
            if bottom[offset + k].shape != (1, N, self.H):
                raise self.error(f"{name}0 (bottom {offset + k}) must be (1, {N}, {self.H}), "
                                 f"got {bottom[offset + k].shape}",
                                 hint="the initial state is one step of N streams of num_output")
        self.T, self.N = T, N
        top[0].reshape((T, N, self.H))
        for t in top[1:]:
            t.reshape((1, N, self.H))
        if self._shape_key != (T, N):
            if self._shape_key is None or self._shape_key[1] != N:
                # Caffe's carried state is kept while N stays; a new N starts from zero.
                self._carry = [self.xp.zeros((N, self.H), dtype=self.dtype)
                               for _ in self.state_names]
            self._shape_key = (T, N)
            self.allocate(T, N)

    def allocate(self, T: int, N: int) -> None:
        """Per-shape buffers for forward and backward."""
        xp, H, dt = self.xp, self.H, self.dtype
        self._pre = xp.empty((T, N, self.gates * H), dtype=dt)  # input projections, then activations
        self._hs = xp.empty((T + 1, N, H), dtype=dt)            # h_0 .. h_T
        self._hc = xp.empty((T, N, H), dtype=dt)                # cont_t * h_{t-1}

    def reset(self) -> None:
        """Zero the state carried from one forward pass to the next (Caffe's Reset)."""
        for s in getattr(self, "_carry", []):
            s[...] = 0

    # ---- shared pieces -----------------------------------------------------
    def project_inputs(self, bottom) -> None:
        """_pre = W_x x_t + b (+ W_x_static x_static) for every step, in one GEMM."""
        xp, T, N = self.xp, self.T, self.N
        G = self.gates * self.H
        pre = self._pre.reshape(T * N, G)
        xp.matmul(bottom[0].data.reshape(T * N, self.I), self.blobs[0].data.T, out=pre)
        pre += self.blobs[1].data
        if self.static_input:
            static = xp.matmul(bottom[2].data.reshape(N, self.S), self.blobs[2].data.T)
            self._pre += static[None]

    def initial_states(self, bottom) -> list:
        """h0 (and c0): from the bottoms with expose_hidden, else carried over."""
        if self.expose_hidden:
            offset = 2 + self.static_input
            return [bottom[offset + k].data.reshape(self.N, self.H)
                    for k in range(len(self.state_names))]
        return self._carry

    def finish_forward(self, finals, top) -> None:
        for k, final in enumerate(finals):
            if self.expose_hidden:
                top[1 + k].data[...] = final.reshape(1, self.N, self.H)
            else:
                self._carry[k][...] = final

    def input_backward(self, dpre, propagate_down, bottom) -> None:
        """Gradients through the input projections, given dpre (T, N, G)."""
        xp, T, N = self.xp, self.T, self.N
        G = self.gates * self.H
        flat = dpre.reshape(T * N, G)
        if self.param_propagate_down[0]:
            self.blobs[0].diff += xp.matmul(flat.T, bottom[0].data.reshape(T * N, self.I))
        if self.param_propagate_down[1]:
            self.blobs[1].diff += flat.sum(axis=0)
        if propagate_down[0]:
            xp.matmul(flat, self.blobs[0].data, out=bottom[0].diff.reshape(T * N, self.I))
        if self.static_input:
            dstatic = dpre.sum(axis=0)
            if self.param_propagate_down[2]:
                self.blobs[2].diff += xp.matmul(dstatic.T, bottom[2].data.reshape(N, self.S))
            if propagate_down[2]:
                xp.matmul(dstatic, self.blobs[2].data, out=bottom[2].diff.reshape(N, self.S))

    def state_backward(self, dstates, propagate_down, bottom) -> None:
        """With expose_hidden, write the gradients reaching h0 (and c0)."""
        if not self.expose_hidden:
            return
        offset = 2 + self.static_input
        for k, d in enumerate(dstates):
            if propagate_down[offset + k]:
                bottom[offset + k].diff[...] = d.reshape(1, self.N, self.H)

    def top_state_diffs(self, top) -> list:
        """Gradients arriving at hT (and cT), or None."""
        if not self.expose_hidden:
            return [None] * len(self.state_names)
        return [t.diff.reshape(self.N, self.H) for t in top[1:]]

    def cont_backward(self, propagate_down, bottom) -> None:
        """The sequence indicators get no gradient (Caffe ignores propagate_down[1] too)."""
        if propagate_down[1]:
            bottom[1].diff[...] = 0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1


@register_layer("RNN")
class RNNLayer(RecurrentLayer):
    """Elman RNN with a tanh output layer; see the module docstring."""

    param_names = {"W_x": "W_xh", "b": "b_h", "W_x_static": "W_xh_static",
                   "W_h": "W_hh", "W_o": "W_ho", "b_o": "b_o"}

    def recurrent_param_shapes(self):
        H = self.H
        return [("W_h", (H, H)), ("W_o", (H, H)), ("b_o", (H,))]

    def forward(self, bottom, top):
        xp, T = self.xp, self.T
        W_hh = self.blobs[-3].data
        self.project_inputs(bottom)
        hs, hc, pre = self._hs, self._hc, self._pre
        hs[0] = self.initial_states(bottom)[0]
        cont = bottom[1].data
        for t in range(T):
            xp.multiply(hs[t], cont[t][:, None], out=hc[t])
            xp.matmul(hc[t], W_hh.T, out=hs[t + 1])
            hs[t + 1] += pre[t]
            xp.tanh(hs[t + 1], out=hs[t + 1])
        o = top[0].data.reshape(T * self.N, self.H)
        xp.matmul(hs[1:].reshape(-1, self.H), self.blobs[-2].data.T, out=o)
        o += self.blobs[-1].data
        xp.tanh(o, out=o)
        self.finish_forward([hs[T]], top)

    def backward(self, top, propagate_down, bottom):
        self.cont_backward(propagate_down, bottom)
        xp, T, N, H = self.xp, self.T, self.N, self.H
        W_hh, W_ho = self.blobs[-3], self.blobs[-2]
        hs, hc = self._hs, self._hc
        o = top[0].data.reshape(T * N, H)
        do = top[0].diff.reshape(T * N, H) * (1 - o * o)
        h_flat = hs[1:].reshape(T * N, H)
        if self.param_propagate_down[-2]:
            W_ho.diff += xp.matmul(do.T, h_flat)
        if self.param_propagate_down[-1]:
            self.blobs[-1].diff += do.sum(axis=0)
        dh = xp.matmul(do, W_ho.data).reshape(T, N, H)  # becomes d(pre-activation) in place
        cont = bottom[1].data
        carry = self.top_state_diffs(top)[0]
        for t in range(T - 1, -1, -1):
            if carry is not None:
                dh[t] += carry
            dh[t] *= 1 - hs[t + 1] * hs[t + 1]
            carry = xp.matmul(dh[t], W_hh.data) * cont[t][:, None]
        if self.param_propagate_down[-3]:
            W_hh.diff += xp.matmul(dh.reshape(T * N, H).T, hc.reshape(T * N, H))
        self.input_backward(dh, propagate_down, bottom)
        self.state_backward([carry], propagate_down, bottom)


@register_layer("LSTM")
class LSTMLayer(RecurrentLayer):
    """Long short-term memory; see the module docstring."""

    state_names = ("h", "c")
    gates = 4
    param_names = {"W_x": "W_xc", "b": "b_c", "W_x_static": "W_xc_static", "W_h": "W_hc"}

    def recurrent_param_shapes(self):
        return [("W_h", (4 * self.H, self.H))]

    def allocate(self, T, N):
        super().allocate(T, N)
        xp, dt = self.xp, self.dtype
        self._cs = xp.empty((T + 1, N, self.H), dtype=dt)     # c_0 .. c_T
        self._tanh_c = xp.empty((T, N, self.H), dtype=dt)

    def forward(self, bottom, top):
        xp, T = self.xp, self.T
        W_hc = self.blobs[-1].data
        self.project_inputs(bottom)
        hs, hc, cs, acts = self._hs, self._hc, self._cs, self._pre
        hs[0], cs[0] = self.initial_states(bottom)
        cont = bottom[1].data
        for t in range(T):
            xp.multiply(hs[t], cont[t][:, None], out=hc[t])
            acts[t] += xp.matmul(hc[t], W_hc.T)
            lstm_unit_forward(xp, acts[t], cont[t], cs[t], cs[t + 1], hs[t + 1], self._tanh_c[t])
        top[0].data[...] = hs[1:]
        self.finish_forward([hs[T], cs[T]], top)

    def backward(self, top, propagate_down, bottom):
        self.cont_backward(propagate_down, bottom)
        xp, T, N, H = self.xp, self.T, self.N, self.H
        W_hc = self.blobs[-1]
        hc, cs, acts = self._hc, self._cs, self._pre
        dgates = xp.empty_like(acts)
        dtop = top[0].diff
        cont = bottom[1].data
        dh_carry, dc = self.top_state_diffs(top)
        for t in range(T - 1, -1, -1):
            dh = dtop[t] if dh_carry is None else dtop[t] + dh_carry
            dc = lstm_unit_backward(xp, acts[t], cs[t], self._tanh_c[t], dc, dh, dgates[t])
            dh_carry = xp.matmul(dgates[t], W_hc.data) * cont[t][:, None]
        if self.param_propagate_down[-1]:
            W_hc.diff += xp.matmul(dgates.reshape(T * N, 4 * H).T, hc.reshape(T * N, H))
        self.input_backward(dgates, propagate_down, bottom)
        self.state_backward([dh_carry, dc], propagate_down, bottom)
