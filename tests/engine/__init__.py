"""Engine tests: the DAR backend inside real vLLM engines (a package, so its conftest and helpers never
shadow the top-level ``conftest`` that tests/test_*.py import)."""
