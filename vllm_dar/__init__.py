"""vllm-dar: dual-dimension (DAR) KV-cache compression for vLLM.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process (main, engine core,
workers); it must stay cheap and idempotent and import nothing heavy.
"""
__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
