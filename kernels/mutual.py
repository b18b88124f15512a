"""Mutual self-attention: one branch's queries attend over the keys and values of several branches
together, each key set with a prior weight, in one kernel and without writing any attention map.

The target's queries q (B, h, Nq, d) against sources s = 0..S-1 (in minid's mask-free mode: T's own
keys and values and O's), k_s, v_s (B, h, Nk, d), with weights π_s(p) ≥ 0, Σ_s π_s(p) = 1 per
query row p:

    out[p] = Σ_s π_s(p) Σ_j exp(q_p·k_sj/sqrt(d)) v_sj  /  Σ_s π_s(p) Σ_j exp(q_p·k_sj/sqrt(d))

which is softmax over the concatenated keys [k_0; k_1; …] with log π_s(p) added to source s's
logits, times the concatenated values [v_0; v_1; …]. Equal weights are plain attention over the
concatenation (the mutual self-attention of MasaCtrl, Cao et al. 2023, and the consistent
self-attention of StoryDiffusion, Zhou et al. 2024, over [K_T; K_O]); π = (0, 1) is the target's
queries over the other branch's keys and values alone (MasaCtrl's Attention(Q_T, K_O, V_O)); a
source with weight 0 contributes nothing. The keys form a set: permuting a source's (k, v) rows
changes nothing, so the other branch need not be position-aligned with the target.

The kernel runs the online softmax (kernels/online_softmax.py) once per source and merges the
sources' running statistics the way flash attention merges key blocks: with m_s, l_s, acc_s a
source's (base-2) max, sum and accumulator, the weighted source has max m_s + log2 π_s, and two
partial softmaxes combine by rescaling to the larger max. The PyTorch statement (`mutual_chunked`
in kernels/chunked.py) concatenates the keys and adds the log-weights.

Caution:
- a source whose weights are zero over a whole query block is skipped (no loads, no matmuls).
- weights are fp32 (B, S, Nq), possibly broadcast with stride 0; the wrapper in kernels/dispatch.py
  checks that rows sum to 1, the kernel does not.
- all sources share B, h, Nk, d with each other (keys of the same resolution), Nq may differ.
"""

from __future__ import annotations

import math

import torch

from .flash_attention import LOG2E, BlockConfig
from .multi_source import launch_weighted
from .online_softmax import online_softmax
from .runtime import lazy_jit

# kernels see triton.language in the namespace runtime.LazyKernel gives them at the first launch
tl = None


def mutual_reference(q, ks, vs, weights: torch.Tensor) -> torch.Tensor:
    """The statement in float64: softmax over the concatenated keys with log π_s added to source
    s's logits, times the concatenated values. weights (B, S, Nq)."""
    q = q.double()
    logits = []
    for s, k in enumerate(ks):
        bias = torch.log(weights[:, s].double())[:, None, :, None]  # (B, 1, Nq, 1); log 0 = −∞
        logits.append(q @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias)
    p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)  # (B, h, Nq, S·Nk)
    return p @ torch.cat([v.double() for v in vs], dim=2)


@lazy_jit
def _mutual_fwd(
    Q,
    K,
    V,
    W,
    Out,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_ks,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vs,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_wb,
    stride_ws,
    stride_wm,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    S,
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
    # One program: BLOCK_M query rows of one (batch, head), every source's keys. K and V are
    # stacked (S, B, h, Nk, d).
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    qk_scale = sm_scale * LOG2E

    q = tl.load(
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    # the merged statistics of the sources seen so far, base 2 as in online_softmax
    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    acc_all = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for src in range(0, S):
        w = tl.load(
            W + off_b * stride_wb + src * stride_ws + offs_m * stride_wm, mask=mask_m, other=0.0
        )
        if tl.max(w, 0) > 0.0:  # skip a source that no row of this block uses
            acc, l_i, m_i = online_softmax(
                q,
                K + src * stride_ks + off_b * stride_kb + off_h * stride_kh,
                V + src * stride_vs + off_b * stride_vb + off_h * stride_vh,
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
            # the prior weight as a logit offset: π e^x = 2^(x·log2 e + log2 π); rows with π = 0
            # get −∞ and add nothing
            m_w = tl.where(w > 0.0, m_i + tl.math.log2(tl.maximum(w, 1e-38)), float("-inf"))
            m_new = tl.maximum(m_all, m_w)
            # rows that no source has reached yet keep −∞; rescale them by 0, not by 2^(−∞ + ∞)
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_all - ref)
            beta = tl.math.exp2(m_w - ref)
            l_all = l_all * alpha + l_i * beta
            acc_all = acc_all * alpha[:, None] + acc * beta[:, None]
            m_all = m_new
    # rows beyond N_Q have no weight (l = 0) and are never stored: divide them by 1, not 0
    out = acc_all / tl.where(l_all > 0.0, l_all, 1.0)[:, None]
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def mutual_triton(
    q: torch.Tensor, ks, vs, weights: torch.Tensor, blocks: BlockConfig | None = None
) -> torch.Tensor:
    """q (B, h, Nq, d); ks, vs lists of S tensors (B, h, Nk, d); weights (B, S, Nq) fp32 -> (B, h,
    Nq, d) in q's dtype."""
    k = torch.stack(ks)  # (S, B, h, Nk, d)
    v = torch.stack(vs)
    return launch_weighted(_mutual_fwd, q, k, v, weights, q.shape, blocks)
