"""Masked multi-source self-attention: per query row, a weighted mix of several branches' attention,
in one kernel and without writing any attention map.

Sources s = 0..S-1 (in EditedID: O, E and the target T) each bring q_s, k_s, v_s of shape (B, h, N,
d). For query row p, weights w_s(p) ≥ 0 with Σ_s w_s(p) = 1 come from the masks at that resolution
(docs/editedid.md, "Mask-selective self-attention replacement"):

    mode "map":     out[p] = Σ_s w_s(p) softmax(q_s k_sᵀ / sqrt(d))[p] V_T      (paper Eq. 7-8: T's
    rows of P
                                                                                replaced, T's
                                                                                values; V_T is the
                                                                                last source's v)
    mode "output":  out[p] = Σ_s w_s(p) softmax(q_s k_sᵀ / sqrt(d))[p] V_s      (blend of each
    branch's output)

Both are exact rewrites of "build the blended map, then multiply": the map's row p is Σ_s w_s(p)
P_s[p] and (Σ_s w_s(p) P_s[p]) V = Σ_s w_s(p) (P_s[p] V), so each source runs the online softmax of
flash attention (kernels/online_softmax.py) and only its normalised output row is weighted. A
blended row stays a probability distribution because the weights of the row sum to 1.

Caution:
- a source whose weights are zero over a whole query block is skipped (no loads, no matmuls). Masks
  are spatially coherent, so most blocks of a 64×64 layer read one or two sources, not three.
- weights are fp32 (B, S, Nq), possibly broadcast over B with stride 0; the wrapper in
  kernels/dispatch.py checks that rows sum to 1, the kernel does not.
- all sources share B, h, N, d; keys and values of the sources may differ (that is the point).
"""

from __future__ import annotations

import math

import torch

from .flash_attention import LOG2E, BlockConfig, default_blocks
from .online_softmax import online_softmax
from .runtime import cdiv, dot_settings, lazy_jit, next_power_of_two

# kernels see triton.language in the namespace runtime.LazyKernel gives them at the first launch
tl = None


def multi_source_reference(qs, ks, vs, weights: torch.Tensor, mode: str = "output") -> torch.Tensor:
    """The statement in float64, building the blended map P' (B, h, Nq, Nk) and multiplying it by
    the values.

    weights (B, S, Nq). Mode "map" multiplies P' by the last source's v; mode "output" multiplies
    each source's weighted rows by its own values (a blend of outputs, which is not one map times
    one V).
    """
    w = weights.double()  # (B, S, Nq)
    out = 0
    blended_map = 0
    for s, (q, k, v) in enumerate(zip(qs, ks, vs)):
        q, k = q.double(), k.double()
        # (B, h, Nq, Nk)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        weighted = w[:, s, None, :, None] * p  # row p of source s scaled by w_s(p)
        if mode == "map":
            blended_map = blended_map + weighted
        else:
            out = out + weighted @ v.double()
    return blended_map @ vs[-1].double() if mode == "map" else out


@lazy_jit
def _multi_source_fwd(
    Q,
    K,
    V,
    W,
    Out,
    stride_qs,
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
    # One program: BLOCK_M query rows of one (batch, head), all sources, all keys. Q and K are
    # stacked (S, B, h, N, d); V too in mode "output", while in mode "map" it is T's values with
    # stride_vs = 0, so every source reads the same V through the same code.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    qk_scale = sm_scale * LOG2E

    out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for src in range(0, S):
        w = tl.load(
            W + off_b * stride_wb + src * stride_ws + offs_m * stride_wm, mask=mask_m, other=0.0
        )
        if tl.max(w, 0) > 0.0:  # skip a source that no row of this block uses
            q = tl.load(
                Q
                + src * stride_qs
                + off_b * stride_qb
                + off_h * stride_qh
                + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            acc, l_i, _ = online_softmax(
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
            # Row p of source src's normalised output, weighted: (Σ_s w_s P_s) V = Σ_s w_s (P_s V).
            out += w[:, None] * (acc / l_i[:, None])
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def multi_source_triton(
    qs, ks, vs, weights: torch.Tensor, mode: str = "output", blocks: BlockConfig | None = None
) -> torch.Tensor:
    """qs, ks, vs lists of S tensors (B, h, N, d); weights (B, S, Nq) fp32 -> (B, h, Nq, d) in q's
    dtype."""
    q = torch.stack(qs)  # (S, B, h, Nq, d)
    k = torch.stack(ks)  # (S, B, h, Nk, d)
    if mode == "map":
        # (S, B, h, Nk, d), stride 0 over S: T's values
        v = vs[-1].unsqueeze(0).expand(len(qs), *vs[-1].shape)
    else:
        v = torch.stack(vs)
    S, B, H, N_Q, D = q.shape
    return launch_weighted(_multi_source_fwd, q, k, v, weights, (B, H, N_Q, D), blocks)


def launch_weighted(kernel, q, k, v, weights, out_shape, blocks: BlockConfig | None):
    """Launch a forward kernel over S weighted sources (masked multi-source, mutual attention):
    one program per BLOCK_M query rows of one (batch, head). q, k, v are passed with all their
    strides (stacked over S or not, as the kernel reads them), k stacked (S, B, h, Nk, d), weights
    (B, S, Nq); out_shape (B, h, Nq, d). Returns the output in q's dtype."""
    B, H, N_Q, D = out_shape
    S, N_K = k.shape[0], k.shape[3]
    block_d = max(16, next_power_of_two(D))
    cfg = blocks or default_blocks(block_d)
    upcast, precision = dot_settings(q.dtype)
    weights = weights.to(torch.float32)
    out = torch.empty(B, H, N_Q, D, dtype=q.dtype, device=q.device)
    grid = (cdiv(N_Q, cfg.block_m), B * H)
    kernel[grid](
        q,
        k,
        v,
        weights,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *weights.stride(),
        *out.stride(),
        S,
        H,
        N_Q,
        N_K,
        D,
        1.0 / math.sqrt(D),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
