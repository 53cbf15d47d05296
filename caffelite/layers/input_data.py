"""Input and DummyData: tops of declared shapes, filled by the caller or by fillers.

They have no bottoms and nothing to propagate.
"""
from __future__ import annotations

from ..fillers import fill
from ..proto import pb
from ..registry import register_layer
from .base import DataLayer, blob_shape_list


@register_layer("DummyData")
class DummyDataLayer(DataLayer):
    """Tops of given shapes filled by fillers (default constant 0).

    Constant fillers fill once at set-up; others refill every forward, as in Caffe.
    """

    param_name = "dummy_data_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        p, n = self.param, len(top)
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if len(p.shape) and any(legacy):
            raise self.error("has both shape and num/channels/height/width", hint="use shape")
        if len(p.shape):
            shapes = [blob_shape_list(s) for s in self._pick(p.shape, n, "shape")]
        elif any(legacy):
            columns = [self._pick(values, n, field) for values, field in
                       zip(legacy, ("num", "channels", "height", "width"))]
            shapes = [list(dims) for dims in zip(*columns)]
        else:
            raise self.error("needs a shape", hint="add dummy_data_param.shape (one, or one per top)")
        if len(p.data_filler):
            self.fillers = self._pick(p.data_filler, n, "data_filler")
        else:
            self.fillers = [pb.FillerParameter(type="constant", value=0)] * n
        self.refill = [f.type != "constant" for f in self.fillers]
        for blob, shape, filler, refill in zip(top, shapes, self.fillers, self.refill):
            blob.reshape(shape)
            if not refill:
                fill(blob, filler, self.rng)

    def _pick(self, values, n: int, field: str) -> list:
        if len(values) == 1:
            return [values[0]] * n
        if len(values) != n:
            raise self.error(f"has {len(values)} {field} entries for {n} tops",
                             hint=f"give one {field}, or one per top")
        return list(values)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for blob, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                fill(blob, filler, self.rng)


@register_layer("Input")
class InputLayer(DataLayer):
    """Declares tops of given shapes (one shape for all tops, or one per top); the caller fills them."""

    param_name = "input_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        shapes = list(self.param.shape)
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"has {len(shapes)} shapes for {len(top)} tops",
                             hint="give one shape, or one per top")
        for i, blob in enumerate(top):
            if shapes:
                blob.reshape(blob_shape_list(shapes[0 if len(shapes) == 1 else i]))

    def reshape(self, bottom, top):
        pass  # the shapes stay as set up or as the user reshaped them

    def forward(self, bottom, top):
        pass
