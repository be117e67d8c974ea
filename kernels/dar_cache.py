"""Triton cache write for DAR: fresh post-RoPE K/V -> full-width window cache and reduced far cache, one pass.

Launcher, grid and block sizes: ``vllm_dar.ops.triton_ops.write_kv_triton``. Plain PyTorch twin:
``vllm_dar.ops.paged.write_slots`` + ``reduce_tokens`` (the tests compare the two).
"""
import triton
import triton.language as tl


@triton.jit
def dar_write_kv_kernel(
    key_ptr,  # [T, J, D] post-RoPE keys of the scheduled tokens
    value_ptr,  # [T, J, D]
    window_cache_ptr,  # [NBw, J, Bw, 2D]: key in [:D], value in [D:]
    window_slots_ptr,  # [T] flat slots (block * Bw + offset); < Bw (negative or null block 0): skip
    far_cache_ptr,  # [NBf, G, Bf, RK + RV]: reduced key in [:RK], reduced value in [RK:]
    far_slots_ptr,  # [T] flat slots into the far cache; < Bf: skip
    k_down_ptr,  # [G, Dg, RK] fp32, contiguous (Dg = HEADS * D)
    v_down_ptr,  # [G, Dg, RV] fp32, contiguous
    stride_kt, stride_kj,  # key strides (token, KV head); the feature stride is 1
    stride_vt, stride_vj,
    stride_wb, stride_wj, stride_ws,  # window cache strides (block, KV head, slot)
    stride_fb, stride_fg, stride_fs,  # far cache strides (block, group, slot)
    HEAD_DIM: tl.constexpr,  # D
    HEADS: tl.constexpr,  # KV heads per projection group (J / G)
    DG_PAD: tl.constexpr,  # next power of two >= HEADS * D
    KEY_RANK: tl.constexpr,
    VALUE_RANK: tl.constexpr,
    RK_PAD: tl.constexpr,
    RV_PAD: tl.constexpr,
    WINDOW_BLOCK: tl.constexpr,  # Bw
    FAR_BLOCK: tl.constexpr,  # Bf
):
    # One program per (token, projection group): the group's K/V are read once and feed both caches.
    tok = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    i = tl.arange(0, DG_PAD)  # feature of the group's concatenated heads
    i_ok = i < HEADS * HEAD_DIM
    head = group * HEADS + i // HEAD_DIM  # [DG_PAD] KV head of each feature
    d = i % HEAD_DIM
    k = tl.load(key_ptr + tok * stride_kt + head * stride_kj + d, mask=i_ok, other=0.0)  # [DG_PAD]
    v = tl.load(value_ptr + tok * stride_vt + head * stride_vj + d, mask=i_ok, other=0.0)  # [DG_PAD]

    # Full width into the window cache (only the slots the allocator kept: sinks and the window).
    # Slot tests are made per lane (slot + 0 * lane): Triton's interpreter mistypes scalar-bool & vector-bool.
    ws = tl.load(window_slots_ptr + tok).to(tl.int64)
    w_ok = i_ok & (ws + 0 * i >= WINDOW_BLOCK)
    w_off = (ws // WINDOW_BLOCK) * stride_wb + head * stride_wj + (ws % WINDOW_BLOCK) * stride_ws + d
    tl.store(window_cache_ptr + w_off, k.to(window_cache_ptr.dtype.element_ty), mask=w_ok)
    tl.store(window_cache_ptr + w_off + HEAD_DIM, v.to(window_cache_ptr.dtype.element_ty), mask=w_ok)

    # Reduced width into the far cache: k_g K_g and v_g V_g, accumulated in fp32.
    rk = tl.arange(0, RK_PAD)
    rv = tl.arange(0, RV_PAD)
    dg = HEADS * HEAD_DIM
    kd = tl.load(k_down_ptr + group * dg * KEY_RANK + i[:, None] * KEY_RANK + rk[None, :],
                 mask=i_ok[:, None] & (rk < KEY_RANK)[None, :], other=0.0)  # [DG_PAD, RK_PAD]
    vd = tl.load(v_down_ptr + group * dg * VALUE_RANK + i[:, None] * VALUE_RANK + rv[None, :],
                 mask=i_ok[:, None] & (rv < VALUE_RANK)[None, :], other=0.0)  # [DG_PAD, RV_PAD]
    k_red = tl.sum(k.to(tl.float32)[:, None] * kd, axis=0)  # [RK_PAD]
    v_red = tl.sum(v.to(tl.float32)[:, None] * vd, axis=0)  # [RV_PAD]
    fs = tl.load(far_slots_ptr + tok).to(tl.int64)
    f_off = (fs // FAR_BLOCK) * stride_fb + group * stride_fg + (fs % FAR_BLOCK) * stride_fs
    tl.store(far_cache_ptr + f_off + rk, k_red.to(far_cache_ptr.dtype.element_ty),
             mask=(rk < KEY_RANK) & (fs + 0 * rk >= FAR_BLOCK))
    tl.store(far_cache_ptr + f_off + KEY_RANK + rv, v_red.to(far_cache_ptr.dtype.element_ty),
             mask=(rv < VALUE_RANK) & (fs + 0 * rv >= FAR_BLOCK))
