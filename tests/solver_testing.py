"""Helpers for solver tests: a SolverParameter for a test net, with the test's own fields."""
from google.protobuf import text_format

from caffelite.proto import pb


def solver_param_for(sp: "pb.SolverParameter", net: str, tmp_path, prefix: str, fields: dict):
    """``sp`` with ``net`` (prototxt text) as its net and ``fields`` set (lists extend repeated
    fields); snapshots go to ``tmp_path / prefix``, or none is taken after training without
    a ``tmp_path``."""
    if tmp_path is not None:
        sp.snapshot_prefix = str(tmp_path / prefix)
    else:
        sp.snapshot_after_train = False
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(sp, key).extend(value)
        else:
            setattr(sp, key, value)
    sp.net_param.CopyFrom(text_format.Parse(net, pb.NetParameter()))
    return sp
