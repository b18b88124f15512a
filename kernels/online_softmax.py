"""The online softmax of flash attention: softmax(q kᵀ · scale) v for a block of query rows, one key
block at a time, as a `@triton.jit` helper that the attention kernels call in their key loop.

The identity that lets softmax stream over keys: for any m,

    Σ_j e^(s_j) v_j / Σ_j e^(s_j) = Σ_j e^(s_j − m) v_j / Σ_j e^(s_j − m),

so the rows keep m = the largest score seen so far (which keeps every e^(s_j − m) ≤ 1, no overflow),
the sum l = Σ_j e^(s_j − m) and the accumulator acc = Σ_j e^(s_j − m) v_j over the keys seen so far.
A key block that raises the max from m_old to m_new multiplies l and acc by e^(m_old − m_new) before
adding its own terms; after the last block, out = acc / l. Scores arrive pre-multiplied by log2(e),
so every exponential is an exp2 (one instruction on GPUs) and m, l are in base 2: log Σ_j e^(s_j) =
ln 2 · (m + log2 l).

Provenance: `_attn_fwd_inner` of the Triton fused-attention tutorial (`06-fused-attention.py`), with
masks for key counts that are no multiple of BLOCK_N and head dims that are no power of two, and
without the causal stages.
"""

from __future__ import annotations

from .runtime import lazy_jit

# kernels see triton.language in the namespace runtime.LazyKernel gives them at the first launch
tl = None


@lazy_jit
def online_softmax(
    q,
    K,
    V,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    N_K,
    HEAD_DIM,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(acc, l, m) of q (BLOCK_M, BLOCK_D) against all N_K keys and values of one (batch, head): K
    and V point at key 0, head dim 0. out = acc / l; the row log-sum-exp is ln 2 · (m + log2 l).
    qk_scale is 1/sqrt(d) · log2(e). acc, l and m are fp32."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # head dims 40/80/160 live in 64/128/256-wide tiles; the rest loads as 0
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the (log2-scaled) scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running Σ 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running Σ 2^(s - m_i) v
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        # -- scores of this key block --
        kt = tl.load(
            K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N): kᵀ
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        # keys beyond N_K (77 is no block multiple) get P = 0
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # -- new max, and the factor that rescales what was summed under the old one (0 on the first
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        # -- update l_i --
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the accumulator --
        v = tl.load(
            V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        # P in the input dtype for the tensor-core matmul, as flash attention
        p_lo = p.to(V.dtype.element_ty)
        if UPCAST:
            v = v.to(tl.float32)
            p_lo = p_lo.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i
