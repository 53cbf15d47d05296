"""Readers for the real-Caffe golden files of shared/fixtures/caffe/net."""
import lmdb
import numpy as np

from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES

NET_DIR = FIXTURES / "net"


def caffe_blob(name: str) -> np.ndarray:
    """A blob Caffe's extract_features wrote for the fixture net: the 8 items stacked, (8, C, H, W)."""
    env = lmdb.open(str(NET_DIR / "features" / name), readonly=True, lock=False)
    items = []
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = pb.Datum()
            datum.ParseFromString(value)
            items.append(np.array(datum.float_data, np.float32).reshape(
                datum.channels, datum.height, datum.width))
    env.close()
    return np.stack(items)


def caffe_weights(model: str = "fixture_iter_20.caffemodel") -> dict[str, list[np.ndarray]]:
    """Layer name -> its parameter arrays, from one of the fixture caffemodels."""
    net = pb.NetParameter()
    net.ParseFromString((NET_DIR / model).read_bytes())
    return {layer.name: [blob_proto_to_array(b) for b in layer.blobs] for layer in net.layer}
