"""Benchmarks and the load generator: the relay against generate(), GEMM kernels, the training job."""
