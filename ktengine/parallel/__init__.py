"""Tensor parallelism: one process per rank, attention heads and dense MLPs split across ranks,
GPU experts sliced, CPU experts computed once on rank 0 (docs/tensor_parallel.md)."""
