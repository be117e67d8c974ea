"""Rewind a seeded request's CPU generator exactly when vLLM discards the token sampled for a partial prefill.

Target
    vLLM 0.32.0: ``vllm/v1/worker/gpu_model_runner.py:GPUModelRunner._bookkeeping_sync`` (inherited by
    ``vllm/v1/worker/cpu_model_runner.py:CPUModelRunner``), the loop over ``discard_request_mask`` that calls
    ``gen.set_offset(gen.get_offset() - 4)`` on each discarded request's generator; ``GPUModelRunner._sample``
    draws from those generators just before.
Why
    A request with a ``seed`` gets its own ``torch.Generator``; on the CPU platform it is a CPU generator, which has
    no offset: ``get_offset()`` raises "CPU Generator does not use offset". The loop runs whenever a seeded
    request's prompt is prefilled in more than one chunk (a long prompt, or a step whose token budget other
    requests share), so the engine core dies and every in-flight request fails. ``benchmarks/soak.py`` hit it
    with stock vLLM and with DAR alike. The offset arithmetic (4 per draw) is CUDA's Philox layout in any case.
How
    ``install()`` wraps two methods of ``CPUModelRunner``. ``_sample``: snapshots the state of every discarded
    request's CPU generator before sampling and restores it after, which is exactly "as if the token was not
    sampled" (what the offset rewind approximates on CUDA), then lifts those generators out of
    ``input_batch.generators`` so the offset loop skips them. ``_bookkeeping_sync``: puts them back when it
    returns (also at the next ``_sample`` if a step failed in between). Installed by ``vllm_dar.plugin.cpu``'s
    impl, i.e. in the process that runs the CPU model runner, for every model (the crash is not DAR's).
Remove when
    vLLM's CPU runner stops calling ``get_offset``/``set_offset`` on CPU generators (an upstream fix), or the two
    methods change shape: ``test_seeded_partial_prefill_target_unchanged`` in ``tests/patches/test_patches.py``
    fails then; ``tests/engine/test_seeded_chunked.py`` checks the behaviour through the engine.
"""

_MARK = "_vllm_dar_seeded_partial_prefill"  # set on our wrappers: install() never wraps twice
_HIDDEN = "_vllm_dar_rewound_generators"  # runner attribute: {batch index: generator} lifted for bookkeeping


def _restore_hidden(runner) -> None:
    hidden = runner.__dict__.pop(_HIDDEN, None)
    if hidden:
        runner.input_batch.generators.update(hidden)


def install() -> None:
    """Wrap ``CPUModelRunner._sample`` and ``_bookkeeping_sync`` (idempotent)."""
    import functools

    import numpy as np
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync
    if getattr(sample, _MARK, False):
        return

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        _restore_hidden(self)
        gens = self.input_batch.generators
        n = self.input_batch.num_reqs
        discard = (int(i) for i in np.nonzero(self.discard_request_mask.np[:n])[0])
        states = {i: gens[i].get_state() for i in discard if i in gens and gens[i].device.type == "cpu"}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                gens[i].set_state(state)  # as if this step drew nothing for the discarded token
            setattr(self, _HIDDEN, {i: gens.pop(i) for i in states})

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            _restore_hidden(self)

    setattr(_sample, _MARK, True)
    setattr(_bookkeeping_sync, _MARK, True)
    CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync = _sample, _bookkeeping_sync


def installed() -> bool:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return getattr(CPUModelRunner._sample, _MARK, False) and getattr(CPUModelRunner._bookkeeping_sync, _MARK, False)
