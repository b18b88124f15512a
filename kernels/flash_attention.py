"""Fused attention forward (flash attention) that can also return the row log-sum-exp and the
head-averaged attention map, for Stable Diffusion 1.4's shapes.

    out = softmax(q kᵀ / sqrt(d)) v        q (B, h, Nq, d), k and v (B, h, Nk, d)
    lse[b, h, i] = log Σ_j exp(q_i · k_j / sqrt(d))                          (B, h, Nq), fp32
    map[b, i, j] = (1/h) Σ_h exp(q_i · k_j / sqrt(d) − lse[b, h, i])           (B, Nq, Nk), fp32

Provenance: the online softmax (kernels/online_softmax.py) and the program layout follow the Triton
fused-attention tutorial (`06-fused-attention.py`) and Tri Dao's `flash_attn_triton.py`;
`attention_reference` below is the plain PyTorch statement the kernels are tested against.

Changes from the tutorial:
- forward only and non-causal: the UNet's attention has no mask; gradients use the PyTorch paths.
- plain pointer arithmetic with masks instead of block pointers, so any Nq and Nk work (77 text
  tokens, 64·64 = 4096 pixels) and q, k, v may be strided views (the UNet's head split is a
  permute).
- head dims 40, 80, 160 are not powers of two: tiles are BLOCK_D = next power of two wide (64, 128,
  256) and the loads mask the missing columns to zero, which changes no dot product.
- a second kernel writes the head-averaged map from the LSE of the first (two passes over K),
  because the controllers (attention store, local blend, visualisation) need P itself for
  cross-attention.

Caution:
- the padding of the head dim costs tensor-core work: both matmuls run on BLOCK_D columns, 1.6× the
  useful FLOPs for d = 40 (64/40), 80 (128/80) and 160 (256/160). Loads and stores are masked, so
  memory traffic is not padded.
- the map is (B, Nq, Nk) in fp32: 64 MiB per image for a 64×64 self-attention layer. Ask for it on
  cross-attention (Nk = 77); `masked_multi_source` and `token_replace` edit attention without
  writing P.
- fp16/bf16 inputs: P is rounded to the input dtype before P·V (as every flash attention does); the
  accumulators, the softmax statistics, the LSE and the map are fp32.
- bf16 under the Triton interpreter: see `runtime.dot_settings` (tiles are upcast before `tl.dot`).
- block sizes in `BlockConfig` are chosen by reading, not by autotuning; `bench/attention.py`
  measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .online_softmax import online_softmax
from .runtime import cdiv, dot_settings, lazy_jit, next_power_of_two

# kernels see triton.language in the namespace runtime.LazyKernel gives them at the first launch
tl = None

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = 2^(x·log2 e), one instruction on GPUs


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch settings of the attention kernels (one program = BLOCK_M query
    rows)."""

    # query rows per program; 64 keeps d = 256 tiles within registers and shared memory
    block_m: int = 64
    block_n: int = 64  # keys per step of the online softmax; 77 text tokens take two steps
    # warps per program; 8 for 256-wide head tiles, where one warp group is too slow
    num_warps: int = 4
    # software-pipelining depth of the key loop (shared-memory buffers for K and V)
    num_stages: int = 2


def default_blocks(block_d: int) -> BlockConfig:
    """Tiles for a padded head dim: 64 and 128 use 64×64; 256 halves the key step to fit shared
    memory."""
    if block_d >= 256:
        return BlockConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    return BlockConfig()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The statement, materialising P in float64: returns (out, head-averaged map, lse) as
    float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, Nq, Nk)
    lse = torch.logsumexp(scores, dim=-1)  # (B, h, Nq)
    p = torch.exp(scores - lse[..., None])
    return p @ v, p.mean(dim=1), lse


@lazy_jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lm,
    H,
    N_Q,
    N_K,
    HEAD_DIM,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, head), all keys.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    # head dims 40/80/160 live in 64/128/256-wide tiles; the rest loads as 0
    mask_d = offs_d < HEAD_DIM

    q_ptrs = (
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * LOG2E  # fold 1/sqrt(d) and log2(e) into one multiply
    # Rows beyond N_Q see q = 0: harmless, and never stored.
    acc, l_i, m_i = online_softmax(
        q,
        K + off_b * stride_kb + off_h * stride_kh,
        V + off_b * stride_vb + off_h * stride_vh,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        N_K,
        HEAD_DIM,
        qk_scale,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        UPCAST,
        PRECISION,
    )

    # Normalise once at the end: out = Σ 2^(s-m) v / Σ 2^(s-m).
    acc = acc / l_i[:, None]
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if STORE_LSE:
        # log Σ exp(score) = ln 2 · (m + log2 l), back from base 2 to the natural log.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=mask_m)


@lazy_jit
def _attn_map(
    Q,
    K,
    Lse,
    Map,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mm,
    stride_mn,
    H,
    N_Q,
    N_K,
    HEAD_DIM,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program: a BLOCK_M × BLOCK_N tile of the map of one batch element, summed over the heads.
    # With the LSE known, P = exp(score - lse) needs no running statistics: this is the second pass
    # over K.
    start_m = tl.program_id(0)
    start_n = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_n = cols < N_K
    mask_d = offs_d < HEAD_DIM
    qk_scale = sm_scale * LOG2E

    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for off_h in range(0, H):
        q = tl.load(
            Q
            + off_b * stride_qb
            + off_h * stride_qh
            + offs_m[:, None] * stride_qm
            + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        kt = tl.load(
            K
            + off_b * stride_kb
            + off_h * stride_kh
            + cols[None, :] * stride_kn
            + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        lse = tl.load(
            Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, mask=mask_m, other=0.0
        )
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        total += tl.math.exp2(s - lse[:, None] * LOG2E)
    total = total / H
    tl.store(
        Map + off_b * stride_mb + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn,
        total,
        mask=mask_m[:, None] & mask_n[None, :],
    )


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    want_map: bool = False,
    want_lse: bool = False,
    blocks: BlockConfig | None = None,
):
    """(out (B, h, Nq, d) in q's dtype, map (B, Nq, Nk) fp32 | None, lse (B, h, Nq) fp32 | None)."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    block_d = max(16, next_power_of_two(D))  # tl.dot needs every tile side ≥ 16
    cfg = blocks or default_blocks(block_d)
    upcast, precision = dot_settings(q.dtype)
    sm_scale = 1.0 / math.sqrt(D)
    out = torch.empty(B, H, N_Q, D, dtype=q.dtype, device=q.device)
    store_lse = want_lse or want_map
    # out: unused pointer
    lse = torch.empty(B, H, N_Q, dtype=torch.float32, device=q.device) if store_lse else out
    grid = (cdiv(N_Q, cfg.block_m), B * H)
    _attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *(lse.stride()[:3] if store_lse else (0, 0, 0)),
        H,
        N_Q,
        N_K,
        D,
        sm_scale,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        STORE_LSE=store_lse,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    attn_map = None
    if want_map:
        attn_map = torch.empty(B, N_Q, N_K, dtype=torch.float32, device=q.device)
        grid = (cdiv(N_Q, cfg.block_m), cdiv(N_K, cfg.block_n), B)
        _attn_map[grid](
            q,
            k,
            lse,
            attn_map,
            *q.stride(),
            *k.stride(),
            *lse.stride(),
            *attn_map.stride(),
            H,
            N_Q,
            N_K,
            D,
            sm_scale,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=block_d,
            UPCAST=upcast,
            PRECISION=precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out, attn_map, (lse if want_lse else None)
