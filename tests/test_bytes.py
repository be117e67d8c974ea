"""The KV byte model (``vllm_dar.config``): its formulas by hand, the README's figures, and the callers that
must agree with it (evaluation report, calibrated schedule, the plugin's start-up line)."""
from __future__ import annotations

import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

from vllm_dar.config import DarConfig, ModelShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


def test_readme_numbers_for_the_default_model():
    # SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, D=64; fp16 cache; 4K context, w=64, ranks 16/16 per
    # head.
    cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=16, value_rank=16, sink_tokens=0)
    b = cfg.decode_bytes(4096, itemsize=2)
    full, dar, proj = b.full, b.dar, b.projections
    assert (full, dar, proj) == (94_371_840, 24_698_880, 2_949_120)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())
    for figure in (f"{full / 1e6:.1f} MB for full attention", f"{dar / 1e6:.1f} MB for DAR",
                   f"{proj / 1e6:.1f} MB of projections", f"{full / dar:.2f}x at large batch",
                   f"{full / (dar + proj):.2f}x at batch 1"):
        assert figure in readme


def test_short_context_reads_no_far_bytes():
    """A context inside the window is full attention plus the fresh token's share: DAR saves nothing there."""
    b = DarConfig.uniform(SMOLLM2, window=64, key_rank=16, value_rank=16, sink_tokens=4).decode_bytes(50, 2)
    assert b.dar == b.full


@pytest.mark.parametrize("head_sharing", ["per_head", "joint"])
def test_held_and_read_by_hand(head_sharing):
    shape = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = DarConfig(shape=shape, window=(4, 0), key_rank=(2, 5), value_rank=(3, 1), sink_tokens=1,
                    head_sharing=head_sharing)
    g = 2 if head_sharing == "per_head" else 1
    slot = 2 * 2 * 8  # K + V, 2 KV heads, D = 8
    reduced = [g * 5, g * 6]
    full = [5, 1]  # window + sinks
    L = 100
    assert cfg.kv_elems(L) == sum(L * r + f * slot for r, f in zip(reduced, full))
    assert cfg.kv_fraction(L) == cfg.kv_elems(L) / (L * 2 * slot)
    assert cfg.kv_bytes_per_token(L, 4) == cfg.kv_elems(L) * 4 / L
    assert cfg.far_elems_per_token() == sum(reduced)
    b = cfg.decode_bytes(L, itemsize=2)
    assert b.dar == 2 * sum((L - f) * r + f * slot for r, f in zip(reduced, full))
    assert b.full == 2 * L * 2 * slot
    assert b.projections == 4 * (4 + 2) * 8 * (5 + 6)  # fp32 Q_h, U_h per query head; K_g, V_g
    # 3 tokens: layer 0 (w=4, 1 sink) holds all 3 at full width, layer 1 (w=0, 1 sink) only the sink; both
    # hold the reduced K/V of all 3.
    assert cfg.kv_elems(3) == (3 * reduced[0] + 3 * slot) + (3 * reduced[1] + 1 * slot)


def test_reserved_fraction_counts_the_window_cache_blocks():
    """Windows priced as the window cache reserves them: sink blocks plus two block-rounded tails of w - 1."""
    from vllm_dar.config import window_cache_blocks

    assert window_cache_blocks(64, 4, 16, tails=2) == 1 + 2 * (4 + 1)  # 63 positions touch up to 5 blocks
    assert window_cache_blocks(65, 0, 16, tails=1) == 5  # 64 positions: 4 blocks, 5 when not aligned
    assert window_cache_blocks(0, 0, 16, tails=2) == 2 and window_cache_blocks(1, 16, 16, tails=0) == 1
    cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=16, value_rank=16, sink_tokens=4)
    full = 2048 * 384
    assert cfg.reserved_fraction(2048) == pytest.approx((2048 * 96 + 11 * 16 * 384) / full)
    assert cfg.reserved_fraction(2048) > cfg.kv_fraction(2048)
    # windows capped at the context; the far cache in whole 64-token pages (96 elements per token divide 16 x 384)
    assert cfg.reserved_fraction(100) == pytest.approx((128 * 96 + 100 * 384) / (100 * 384))
    assert cfg.reserved_fraction(2048, block_size=1) == pytest.approx((2048 * 96 + (4 + 2 * 64) * 384) / full)


def test_reserved_fraction_counts_padded_far_pages():
    """A far page holds a window page's bytes: joint ranks 48/32 (80 per token) fit 64 tokens in 16 x 384 elements
    and pay for 96 per token; 48/48 pay exactly their 96. The last page is whole (2048 tokens: 43 of 48)."""
    full = 2048 * 384
    for (rk, rv), far_block in (((48, 32), 64), ((48, 48), 64), ((64, 80), 32), ((64, 64), 48)):
        cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=rk, value_rank=rv, sink_tokens=4,
                                head_sharing="joint")
        pages = -(-2048 // far_block)
        assert cfg.reserved_fraction(2048) == pytest.approx((pages * 16 * 384 + 11 * 16 * 384) / full), (rk, rv)


def test_reserved_fraction_prices_an_fp8_far_cache():
    """Served with ``--kv-cache-dtype fp8``, a far page (a window page's bytes) holds 2x (bf16 window) or 4x
    (fp32) the tokens of one in the model dtype: 96 reduced elements per token take 128- or 256-token pages,
    and the fraction counts bytes against full attention's in the window's dtype."""
    cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=48, value_rank=48, sink_tokens=4, head_sharing="joint")
    full, window = 2048 * 384, 11 * 16 * 384
    for itemsizes, far_block in (((1, 1), 64), ((2, 2), 64), ((2, 1), 128), ((4, 1), 256)):
        pages = -(-2048 // far_block)
        assert cfg.reserved_fraction(2048, 16, *itemsizes) == pytest.approx((pages * 16 * 384 + window) / full)
        assert cfg.far_block_tokens(16, *itemsizes)[0] == far_block
    assert cfg.reserved_fraction(2048, 16, 2, 1) < cfg.reserved_fraction(2048)


def test_calibrated_schedule_buys_rank_when_far_elements_are_cheap():
    """One layer, two windows, two ranks: priced in the model dtype the budget buys window 128 at ranks 16/16
    (error 3); priced for an FP8 far cache beside a bf16 window the same budget buys window 32 at ranks 48/48
    (error 2), which costs 0.305 of the full bytes in the model dtype and 0.18 with far elements at half price."""
    from vllm_dar.convert.schedule import calibrated

    ek = torch.tensor([[3.0, 1.0], [1.5, 0.6]])  # [window 32, 128] x [rank 16, 48]
    ev = torch.tensor([[3.0, 1.0], [1.5, 0.5]])
    for itemsizes, expected in (((1, 1), (128, 16, 16)), ((2, 1), (32, 48, 48))):
        s = calibrated([(ek, ev)], windows=(32, 128), ranks=(16, 48), groups=1, full_per_token=384, context=2048,
                       sink_tokens=4, budget=0.24, block_size=16, itemsizes=itemsizes)[0]
        assert (s.window, s.key_rank, s.value_rank) == expected, itemsizes
        cfg = DarConfig.uniform(SMOLLM2, window=s.window, key_rank=s.key_rank, value_rank=s.value_rank,
                                sink_tokens=4, head_sharing="joint")
        assert cfg.reserved_fraction(2048, 16, *itemsizes) <= 0.24


def test_calibrated_schedule_pays_for_page_padding():
    """Key and value ranks are chosen as a pair: with the other pairs' errors equal, 48/32 (80 per token, paged
    as 96) loses to 48/48 (96, paged as 96), which the separate choice of each rank could not see."""
    from vllm_dar.convert.schedule import calibrated

    windows, ranks = (32,), (16, 32, 48, 64)
    ek = torch.tensor([[4.0, 2.0, 1.0, 1.0]])  # keys: 48 is as good as 64
    ev = torch.tensor([[4.0, 2.0, 1.5, 1.4]])  # values: 48 a little better than 32
    for block_size, expected in ((None, (48, 32)), (16, (48, 48))):
        # Room for 80 elements per token held, or for 96 paid (window 32: 36 slots held, 7 blocks reserved).
        budget = (36 * 384 / 2048 + 80) / 384 if block_size is None else (7 * 16 * 384 / 2048 + 96) / 384
        s = calibrated([(ek, ev)], windows=windows, ranks=ranks, groups=1, full_per_token=384, context=2048,
                       sink_tokens=4, budget=budget, block_size=block_size)
        assert (s[0].key_rank, s[0].value_rank) == expected, block_size


def test_rank_grid_fills_the_kernel_tiles():
    from vllm_dar.convert.schedule import RANK_TILE, rank_grid

    assert rank_grid(192) == [16, 32, 48, 64, 80, 96]  # joint SmolLM2: whole 16-rank tiles
    assert all(r % RANK_TILE == 0 for r in rank_grid(3 * 128))
    assert rank_grid(64) == [8, 16, 24, 32] and rank_grid(4) == [2]  # narrow groups: half tiles, or half the width


def test_kv_report_is_the_byte_model():
    from vllm_dar.evaluate import kv_report

    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, hidden_size=576, head_dim=64)
    cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=16, value_rank=16, sink_tokens=4)
    for dtype in (torch.float32, torch.bfloat16):
        r = kv_report(cfg, hf, 2048, dtype)
        assert r["full_kv_bytes_per_token"] == SMOLLM2.kv_bytes_per_token(dtype.itemsize)
        assert r["kv_bytes_per_token"] == round(cfg.kv_bytes_per_token(2048, dtype.itemsize), 2)
        assert r["kv_fraction"] == round(cfg.kv_fraction(2048), 5)
    stock = SimpleNamespace(**{**vars(hf), "architectures": ["GPT2LMHeadModel"]})  # any stock model reports
    assert kv_report(None, stock, 2048, torch.float32)["kv_bytes_per_token"] == 46080


@pytest.mark.parametrize("itemsizes", [(1, 1), (2, 1)])
@pytest.mark.parametrize("budget", [0.15, 0.2, 0.283, 0.4])
def test_calibrated_schedule_stays_within_the_budget(budget, itemsizes):
    """convert's calibrated schedule counts bytes in its own vectorised form: its picks must fit ``budget``
    under the byte model, in the model dtype and priced for an FP8 far cache beside a bf16 window."""
    from vllm_dar.convert.schedule import calibrated

    shape = ModelShape(num_layers=6, num_heads=9, num_kv_heads=3, head_dim=64)
    windows, ranks = (32, 64, 128, 256), (8, 16, 24, 32)
    g = torch.Generator().manual_seed(0)
    def rand():
        return torch.rand(len(windows), len(ranks), generator=g)

    errors = [(rand(), rand()) for _ in range(shape.num_layers)]
    w_size, f_size = itemsizes
    held = lambda cfg, n: (cfg.kv_fraction(n) - (1 - f_size / w_size) * cfg.far_elems_per_token()
                           / cfg.shape.kv_elems(1))  # far elements at their price
    for block_size, spent in ((None, held), (16, lambda cfg, n: cfg.reserved_fraction(n, 16, *itemsizes))):
        least = 0.18 if itemsizes == (1, 1) else 0.12  # window 32 reserved (7 blocks) at ranks 8/8
        if block_size and budget < least:  # below it: refused (next test)
            with pytest.raises(ValueError, match="below the smallest setting"):
                calibrated(errors, windows=windows, ranks=ranks, groups=3, full_per_token=shape.slot_elems,
                           context=2048, sink_tokens=4, budget=budget, block_size=block_size, itemsizes=itemsizes)
            continue
        def spend(b, block_size=block_size, spent=spent):
            s = calibrated(errors, windows=windows, ranks=ranks, groups=3, full_per_token=shape.slot_elems,
                           context=2048, sink_tokens=4, budget=b, block_size=block_size, itemsizes=itemsizes)
            return spent(DarConfig(shape=shape, window=tuple(x.window for x in s), sink_tokens=4,
                                   key_rank=tuple(x.key_rank for x in s), value_rank=tuple(x.value_rank for x in s)),
                         2048)

        fraction = spend(budget)
        assert fraction <= budget + 1e-9, block_size
        least_error = spend(1.0)  # each layer's lowest error, whatever it costs (the errors are random)
        assert fraction > min(budget, least_error) - 0.05, block_size  # it spends the budget, by the same count


@pytest.mark.parametrize("head_sharing", ["per_head", "joint"])
def test_one_tensor_parallel_rank_by_hand(head_sharing):
    """A rank holds its KV heads' share of the window cache; of the far caches too where it owns whole groups
    (per head), all of them where one group spans the ranks (joint)."""
    shape = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = DarConfig(shape=shape, window=(4, 0), key_rank=(2, 5), value_rank=(3, 1), sink_tokens=1,
                    head_sharing=head_sharing)
    # 100 tokens: full width (5 + 1) x 32 elements = 192 in all, half on each rank; far (5 + 6) x 100 per group,
    # two groups split over the ranks (per head) or one group whole on each (joint): 1100 a rank either way.
    assert cfg.far_shards(2) == (2 if head_sharing == "per_head" else 1) and cfg.far_shards(1) == 1
    assert cfg.rank_kv_bytes_per_token(100, 4, 2) == (96 + 1100) * 4 / 100
    assert cfg.rank_kv_bytes_per_token(100, 4, 1) == cfg.kv_bytes_per_token(100, 4) == ((192 + 1100 * (
        2 if head_sharing == "per_head" else 1)) * 4 / 100)


def test_plugin_summary_line_is_the_byte_model():
    from vllm_dar.plugin import model as plugin_model

    cfg = DarConfig.uniform(SMOLLM2, window=64, key_rank=16, value_rank=16, sink_tokens=4)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    plugin_model.logger.addHandler(handler)
    level = plugin_model.logger.level
    plugin_model.logger.setLevel(logging.INFO)
    try:
        plugin_model.log_summary("/test/bytes-summary", plugin_model.DarModel(cfg, ()), 4, 4160,
                                 ops="cpp", block_size=16)
    finally:
        plugin_model.logger.removeHandler(handler)
        plugin_model.logger.setLevel(level)
    line = records[0].getMessage()
    want = (f"KV bytes/token at 4160 context: {cfg.kv_bytes_per_token(4160, 4):.0f} vs "
            f"{SMOLLM2.kv_bytes_per_token(4)} full (")
    assert want in line, line
    assert re.search(rf"far cache alone {cfg.far_elems_per_token() * 4} bytes/token", line)


def test_far_cache_in_fp8_by_hand():
    """``--kv-cache-dtype fp8`` stores the far cache at one byte per element beside a window cache in the model
    dtype (vllm_dar.kv_dtype.cache_dtypes): held and read bytes count each cache at its own width."""
    shape = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = DarConfig(shape=shape, window=(4, 0), key_rank=(2, 5), value_rank=(3, 1), sink_tokens=1)
    # 100 tokens: full width (5 + 1) x 32 = 192 elements at 4 bytes; far (10 + 12) x 100 = 2200 at 1 byte.
    assert cfg.kv_bytes_per_token(100, 4, 1) == (192 * 4 + 2200) / 100
    assert cfg.kv_bytes_per_token(100, 4) == (192 + 2200) * 4 / 100
    assert cfg.rank_kv_bytes_per_token(100, 4, 2, 1) == (96 * 4 + 1100) / 100
    # A decode step reads the sinks + window at full width (5 + 1 positions) and the far rest: 95 x 10 + 99 x 12.
    b = cfg.decode_bytes(100, 4, 1)
    assert (b.dar, b.full) == (192 * 4 + 95 * 10 + 99 * 12, shape.kv_elems(100) * 4)


def test_fp8_window_flag_chooses_the_cache_dtypes(monkeypatch):
    """The far cache alone is FP8 unless VLLM_DAR_FP8_WINDOW=1; a bad value is refused by name."""
    from vllm_dar.kv_dtype import cache_dtypes

    monkeypatch.delenv("VLLM_DAR_FP8_WINDOW", raising=False)
    assert cache_dtypes("auto") == (None, None)
    assert cache_dtypes("fp8") == (None, torch.float8_e4m3fn)
    assert cache_dtypes("fp8_e5m2") == (None, torch.float8_e5m2)
    monkeypatch.setenv("VLLM_DAR_FP8_WINDOW", "1")
    assert cache_dtypes("fp8_e4m3") == (torch.float8_e4m3fn, torch.float8_e4m3fn)
    assert cache_dtypes("auto") == (None, None)
    monkeypatch.setenv("VLLM_DAR_FP8_WINDOW", "yes")
    with pytest.raises(ValueError, match="VLLM_DAR_FP8_WINDOW='yes': expected 0 or 1"):
        cache_dtypes("fp8")


def test_cache_itemsizes_follow_the_layout(monkeypatch):
    """Bytes per element of (window, far) as served: a stock model's one cache FP8 wholly; DAR's far cache, and
    its window with the flag (given, or the environment's)."""
    from vllm_dar.kv_dtype import cache_itemsizes

    monkeypatch.delenv("VLLM_DAR_FP8_WINDOW", raising=False)
    assert cache_itemsizes("auto", 4) == (4, 4) and cache_itemsizes("fp8", 4) == (4, 1)
    assert cache_itemsizes("fp8", 2, fp8_window=True) == (1, 1)
    assert cache_itemsizes("fp8_e5m2", 4, dar=False) == (1, 1) and cache_itemsizes("auto", 2, dar=False) == (2, 2)
    monkeypatch.setenv("VLLM_DAR_FP8_WINDOW", "1")
    assert cache_itemsizes("fp8", 4) == (1, 1) and cache_itemsizes("fp8", 4, fp8_window=False) == (4, 1)
