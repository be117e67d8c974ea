"""Small, indexed patches to vLLM where no public seam exists (installed as ``vllm_dar.patches``)."""
