"""Benchmarks: the backend x precision x size x batch matrix, the synthetic model and anomalib's baseline row."""
