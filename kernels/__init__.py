"""Triton kernels for DAR paged attention (installed as ``vllm_dar.kernels``)."""
