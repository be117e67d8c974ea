"""DAR kernels (installed as ``vllm_dar.kernels``): the Triton kernels of the GPU path in this package, the C++
CPU ops' sources in ``cpu/`` (built and launched by ``vllm_dar.ops.cpp``)."""
