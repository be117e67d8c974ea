"""The attention launcher is CUDA-graph capturable: no host sync, no allocation once warm, grids from shapes only.

On any device: the launch plan is checked with the three kernels stubbed out (``_Recorder``): two calls on batches
of equal shapes and different contents make no host read of a tensor and no allocation (a ``TorchFunctionMode``
sees every torch call the launcher makes), launch the same grids and hand the kernels the same scratch. On CUDA: a
decode batch captured in a ``torch.cuda.CUDAGraph`` and replayed equals the eager call, follows new contents of
its input buffers, and leaves the rows of padded requests alone, as vLLM pads a replayed decode graph (requests
with no query token and ``seq_len`` 0, null block-table rows, tokens past ``query_start_loc[-1]``).
"""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("triton", reason="the Triton kernels need triton")

from vllm_dar.ops import triton_ops
from vllm_dar.ops.triton_ops import dar_paged_attention_triton

from .layout import Shape, build_batch, kernel_device
from .test_attention import SCALE, TOL

DEVICE = kernel_device()
REQS = [(600, 1), (37, 1), (129, 1), (5, 1)]  # decode-only: one query token per request
SHAPE = Shape(8, 2, 16, 16, 16)
WINDOW, SINKS = 16, 2
# Host reads of tensor values (syncs on CUDA) and allocations: none may happen in a warm launch.
FORBIDDEN = {"item", "tolist", "__int__", "__index__", "__bool__", "__float__", "numpy", "cpu", "cuda", "to",
             "clone", "contiguous", "copy_", "nonzero", "empty", "zeros", "ones", "full", "tensor", "empty_like",
             "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones", "new_full"}
KERNELS = ("dar_query_project_kernel", "dar_far_kernel", "dar_full_kernel")


def decode_batch(seed: int, dtype=torch.float32):
    return build_batch(REQS, SHAPE, window=WINDOW, sinks=SINKS, dtype=dtype, window_block=16, far_block=64,
                       table_dtype=torch.int32, seed=seed, device=DEVICE)


def device_metadata(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """query_start_loc [R + 1] and seq_lens [R] as int32 device tensors, as vLLM's builder hands them over."""
    return (torch.tensor(batch.query_start_loc, dtype=torch.int32, device=DEVICE),
            torch.tensor(batch.seq_lens, dtype=torch.int32, device=DEVICE))


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](**kwargs)`` records the grid and the tensor arguments' addresses."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.log.append((self.name, tuple(grid), {k: v.data_ptr() for k, v in kwargs.items()
                                                      if isinstance(v, torch.Tensor)}))
        return launch


class _TorchCalls(TorchFunctionMode):
    """Names of every torch function and tensor method called inside the block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_warm_launch_syncs_and_allocates_nothing(monkeypatch):
    log: list = []
    for name in KERNELS:
        monkeypatch.setattr(triton_ops, name, _Recorder(name, log))
    batches = [decode_batch(0), decode_batch(1)]  # equal shapes, other contents
    lens1 = torch.tensor([500, 40, 100, 9], dtype=torch.int32, device=DEVICE)  # other lengths, same capacity

    def prepare(b, lens=None):
        qsl, lens0 = device_metadata(b)
        lens = lens0 if lens is None else lens
        kw = b.kwargs(window=WINDOW, sink_tokens=SINKS, scale=SCALE) | {"query_start_loc": qsl, "seq_lens": lens}
        return (b.query, b.key, b.value, torch.empty_like(b.query)), kw, qsl, lens

    args, kw, _, _ = prepare(batches[0])
    dar_paged_attention_triton(*args, **kw)  # warm: sizes the workspace
    log.clear()
    for b, other_lens in zip(batches, (None, lens1)):
        args, kw, qsl, lens = prepare(b, other_lens)
        with _TorchCalls() as calls:
            dar_paged_attention_triton(*args, **kw)
        assert not FORBIDDEN & set(calls.names), f"host sync or allocation in a warm launch: {calls.names}"
        assert [p["query_start_loc_ptr"] for _, _, p in log[-2:]] == [qsl.data_ptr()] * 2, "qsl was copied"
        assert [p["seq_lens_ptr"] for _, _, p in log[-2:]] == [lens.data_ptr()] * 2, "seq_lens was copied"
    first, second = log[:3], log[3:]
    assert [(n, g) for n, g, _ in first] == [(n, g) for n, g, _ in second], "grids must depend on shapes only"
    scratch = ("q_red_ptr", "part_max_ptr", "part_sum_ptr", "part_acc_ptr")
    for (_, _, a), (_, _, b) in zip(first, second):
        assert {k: a[k] for k in scratch if k in a} == {k: b[k] for k in scratch if k in b}, "scratch moved"
    buf = triton_ops.WORKSPACE.buffer(DEVICE)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    assert all(lo <= p[k] < hi for _, _, p in first for k in scratch if k in p), "scratch outside the workspace"


def test_workspace_grows_and_keeps_old_buffers():
    ws = triton_ops.Workspace()
    a = ws.take(DEVICE, 100)
    assert ws.take(DEVICE, 64).data_ptr() == a.data_ptr()  # smaller: the same memory
    b = ws.take(DEVICE, 1000)  # larger: a new buffer; the old one stays allocated (a graph may hold its address)
    assert b.numel() == 1000 and ws.buffer(DEVICE).numel() == 1024 and len(ws._buffers[ws._key(DEVICE)]) == 2


@pytest.mark.skipif(DEVICE.type != "cuda", reason="device indices are CUDA's")
def test_workspace_names_one_device_one_way():
    """Tensors report ``cuda:0``; callers may say ``cuda``: both must carve from one buffer (found on an H200)."""
    ws = triton_ops.Workspace()
    a = ws.take(torch.device("cuda"), 100)
    assert ws.take(a.device, 100).data_ptr() == a.data_ptr() and ws.buffer("cuda").data_ptr() == a.data_ptr()


def _copy_batch(dst, src) -> None:
    """Copy ``src``'s contents into ``dst``'s tensors (the buffers a captured graph reads)."""
    for name in ("query", "key", "value", "window_cache", "window_table", "far_cache", "far_table"):
        getattr(dst, name).copy_(getattr(src, name))
    for f in fields(dst.proj):
        getattr(dst.proj, f.name).copy_(getattr(src.proj, f.name))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_graph_replay_equals_eager(dtype):
    static = decode_batch(0, dtype)
    qsl, lens = device_metadata(static)
    out = torch.full_like(static.query, float("nan"))
    kw = static.kwargs(window=WINDOW, sink_tokens=SINKS, scale=SCALE) | {"query_start_loc": qsl, "seq_lens": lens}

    def step():
        dar_paged_attention_triton(static.query, static.key, static.value, out, **kw)

    torch.cuda.set_sync_debug_mode("error")  # a host sync in the launcher raises
    try:
        step()  # eager: compiles the kernels and sizes the workspace
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager = out.clone()
    tol = TOL[dtype]
    torch.testing.assert_close(eager.float().cpu(), static.reference.float(), rtol=tol, atol=tol)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch's graph docs ask
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "graph replay differs from the eager call"

    other = decode_batch(1, dtype)  # same shapes, new contents in the captured buffers
    _copy_batch(static, other)
    graph.replay()
    torch.testing.assert_close(out.float().cpu(), other.reference.float(), rtol=tol, atol=tol)

    # vLLM's padding of a replayed decode graph: 2 real requests, then 2 with no token, seq_len 0, null tables
    out.fill_(7.0)
    qsl.copy_(torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32))
    lens[2:] = 0
    static.window_table[2:] = 0
    static.far_table[2:] = 0
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:2].float().cpu(), other.reference[:2].float(), rtol=tol, atol=tol)
    assert bool((out[2:] == 7.0).all()), "a padded token's output row was written"
