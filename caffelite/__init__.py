"""caffelite: a Caffe-compatible deep learning framework in Python."""
