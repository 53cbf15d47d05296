"""The data pipeline: Datum records, LMDB and HDF5 sources, Caffe's DataTransformer
and background prefetching. The layers that use them live in
``caffelite.layers`` (``prefetching_layer``, ``data_layer``, ``hdf5_data``,
``memory_data``, ``image_data``, ``window_data``)."""
from .datum import array_to_datum, datum_to_array, decode_datum, decode_image, encode_datum, encode_image
from .lmdb_source import LMDBReader, open_lmdb, write_lmdb
from .transform import DataTransformer

__all__ = ["array_to_datum", "datum_to_array", "decode_datum", "decode_image", "encode_datum",
           "encode_image", "LMDBReader", "open_lmdb", "write_lmdb", "DataTransformer"]
