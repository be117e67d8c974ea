"""The dar section: validation errors name the field, JSON round-trips, byte accounting."""
from __future__ import annotations

import pytest

from vllm_dar.config import DarConfig, DarConfigError, ModelShape

SHAPE = ModelShape(num_layers=3, num_heads=9, num_kv_heads=3, head_dim=64)


def section(**kw):
    d = {"format_version": 1, "window": [64] * 3, "key_rank": [16] * 3, "value_rank": [16] * 3, "sink_tokens": 4}
    d.update(kw)
    return d


def test_round_trip():
    cfg = DarConfig.from_json(section(key_rank=[8, 16, 32], head_sharing="per_head", method="qk"), SHAPE)
    assert DarConfig.from_json(cfg.to_json(), SHAPE) == cfg
    assert cfg.layer(2).key_rank == 32 and cfg.groups == 3 and cfg.group_dim == 64


@pytest.mark.parametrize("bad,field", [
    (dict(key_rank=[16, 65, 16]), "dar.key_rank[1]"),
    (dict(value_rank=[0, 16, 16]), "dar.value_rank[0]"),
    (dict(window=[64, -1, 64]), "dar.window[1]"),
    (dict(window=[64, 64]), "dar.window"),
    (dict(window=64), "dar.window"),
    (dict(key_rank=[16, 16.5, 16]), "dar.key_rank[1]"),
    (dict(sink_tokens=-2), "dar.sink_tokens"),
    (dict(format_version=9), "dar.format_version"),
    (dict(head_sharing="some"), "dar.head_sharing"),
    (dict(projection_file="/abs/path"), "dar.projection_file"),
    (dict(colour="blue"), "unknown field"),
])
def test_errors_name_the_field(bad, field):
    with pytest.raises(DarConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DarConfig.from_json(section(**bad), SHAPE)


def test_missing_field():
    d = section()
    del d["key_rank"]
    with pytest.raises(DarConfigError, match="dar.key_rank: missing"):
        DarConfig.from_json(d, SHAPE)


def test_joint_rank_limit_is_the_group_width():
    DarConfig.from_json(section(head_sharing="joint", key_rank=[192] * 3), SHAPE)
    with pytest.raises(DarConfigError, match="dar.key_rank"):
        DarConfig.from_json(section(head_sharing="joint", key_rank=[193] * 3), SHAPE)


def test_unsupported_architecture():
    with pytest.raises(DarConfigError, match="GPT2LMHeadModel"):
        ModelShape.from_hf_config({"architectures": ["GPT2LMHeadModel"], "num_attention_heads": 12})


def test_kv_fraction():
    cfg = DarConfig.from_json(section(sink_tokens=0), SHAPE)
    # Per layer and token: 3 heads * (16 + 16) reduced + full-width window 64 of 2048 positions.
    want = (2048 * 3 * 32 + 64 * 3 * 128) / (2048 * 3 * 128)
    assert cfg.kv_fraction(2048) == pytest.approx(want)
    assert cfg.kv_fraction(32) == pytest.approx((32 * 96 + 32 * 384) / (32 * 384))  # short: window covers all
