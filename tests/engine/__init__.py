"""Engine tests: the DAR backend inside real vLLM engines, each in its own process (``helpers``). A package, so
its ``helpers`` import as ``engine.helpers`` from other folders (``vllm serve`` tests)."""
