"""Readers and writers of Caffe's files: weights, solver states, binaryproto means."""
