"""Token-selective cross-attention: the target's attention map with the columns of chosen text
tokens taken from other branches' maps, multiplied by the target's values, without writing any map.

For the target T with P_T = softmax(q_T k_Tᵀ / sqrt(d)) (B, h, Nq, Nk) and sources i with P_i
likewise, each target token j names a branch and a column (prompt-to-prompt's replacement, EditedID
Eq. 9):

    P'[:, j] = P_T[:, j]                        if src_branch[j] = -1
    P'[:, j] = P_i[:, src_token[j]]             if src_branch[j] = i ≥ 0
    out = P' V_T

The columns of P' are a split of the key set, so out = Σ_j P'[:, j] V_T[j] is one pass over T's keys
in which each key block gathers, per column, the score q_b · k_b[token] of the branch b that owns
the column. No running softmax is needed: the normalisers of every branch are known from a first
pass (the row log-sum-exp of kernels/flash_attention.py), so P'[p, j] = exp(q_b[p] · k_b[token_j] /
sqrt(d) − lse_b[p]).

Caution:
- P' is NOT renormalised (as in prompt-to-prompt): its rows sum to 1 only when no token is replaced.
- all branches share B, h, Nq, Nk, d (77 text tokens each); `src_token` indexes the source's own
  tokens, so aligning words between two prompts is the caller's job (minid.models.tokenizer gives
  the positions).
- the first pass computes each branch's full forward only for its LSE; for Nk = 77 that is cheap.
"""

from __future__ import annotations

import math

import torch

from .flash_attention import LOG2E, BlockConfig, attention_triton, default_blocks
from .runtime import cdiv, dot_settings, lazy_jit, next_power_of_two

# kernels see triton.language in the namespace runtime.LazyKernel gives them at the first launch
tl = None


def token_replace_reference(
    q_t, k_t, v_t, sources, src_branch: torch.Tensor, src_token: torch.Tensor
):
    """The statement in float64: materialise every branch's map, copy the chosen columns, multiply
    by V_T."""

    def probs(q, k):
        q, k = q.double(), k.double()
        # (B, h, Nq, Nk)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)

    edited = probs(q_t, k_t).clone()
    source_maps = [probs(q_s, k_s) for q_s, k_s in sources]
    for j in range(edited.shape[-1]):
        if int(src_branch[j]) >= 0:
            edited[..., j] = source_maps[int(src_branch[j])][..., int(src_token[j])]
    return edited @ v_t.double()


def branch_tables(src_branch: torch.Tensor, num_sources: int):
    """(branch, token) int32 tables over T's keys, with the target itself as branch `num_sources`
    (the last of the stacked q/k) so the kernel treats every column the same way. Returns (branch,
    keep) as (Nk,)."""
    branch = torch.where(src_branch < 0, torch.full_like(src_branch, num_sources), src_branch)
    return branch.to(torch.int32), src_branch < 0


@lazy_jit
def _token_replace_fwd(
    Q,
    K,
    V,
    Lse,
    Branch,
    Token,
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
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    N_BRANCH,
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
    # One program: BLOCK_M query rows of one (batch, head). Q, K (N_BRANCH, B, h, N, d) stack the
    # sources and, last, the target; Lse (N_BRANCH, B, h, Nq) their row normalisers; V is the
    # target's (B, h, Nk, d).
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        # owner of each column; -1 past N_K: nobody
        branch = tl.load(Branch + cols, mask=mask_n, other=-1)
        token = tl.load(Token + cols, mask=mask_n, other=0)  # the owner's column index
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for br in range(0, N_BRANCH):
            use = branch == br
            # skip a branch that owns no column of this key block
            if tl.max(use.to(tl.int32), 0) > 0:
                q = tl.load(
                    Q
                    + br * stride_qs
                    + off_b * stride_qb
                    + off_h * stride_qh
                    + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0,
                )
                # Gather the owner's key rows k_br[token_j] for the columns it owns (others load 0).
                kt = tl.load(
                    K
                    + br * stride_ks
                    + off_b * stride_kb
                    + off_h * stride_kh
                    + token[None, :] * stride_kn
                    + offs_d[:, None] * stride_kd,
                    mask=use[None, :] & mask_d[:, None],
                    other=0.0,
                )
                if UPCAST:
                    q = q.to(tl.float32)
                    kt = kt.to(tl.float32)
                lse = tl.load(
                    Lse
                    + br * stride_ls
                    + off_b * stride_lb
                    + off_h * stride_lh
                    + offs_m * stride_lm,
                    mask=mask_m,
                    other=0.0,
                )
                s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
                # P_br[p, token_j] = exp(score − lse_br[p]), final values: the normaliser is already
                # known.
                p += tl.where(use[None, :], tl.math.exp2(s - lse[:, None] * LOG2E), 0.0)
        v = tl.load(
            V
            + off_b * stride_vb
            + off_h * stride_vh
            + cols[:, None] * stride_vn
            + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        p_lo = p.to(V.dtype.element_ty)
        if UPCAST:
            v = v.to(tl.float32)
            p_lo = p_lo.to(tl.float32)
        acc += tl.dot(p_lo, v, input_precision=PRECISION)  # P'[:, block] V_T[block]
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def token_replace_triton(
    q_t,
    k_t,
    v_t,
    sources,
    src_branch: torch.Tensor,
    src_token: torch.Tensor,
    blocks: BlockConfig | None = None,
) -> torch.Tensor:
    """q_t (B, h, Nq, d), k_t and v_t (B, h, Nk, d), sources [(q_s, k_s)], src_branch and src_token
    (Nk,)."""
    n_src = len(sources)
    q = torch.stack([qs for qs, _ in sources] + [q_t])  # (S+1, B, h, Nq, d): the target last
    k = torch.stack([ks for _, ks in sources] + [k_t])  # (S+1, B, h, Nk, d)
    n_branch, B, H, N_Q, D = q.shape
    N_K = k.shape[3]
    # Pass 1: every branch's row log-sum-exp, from the forward kernel with the branches as batch
    # (the LSE does not depend on the values, so k stands in for them and that output is dropped).
    _, _, lse = attention_triton(
        q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), want_lse=True, blocks=blocks
    )
    lse = lse.view(n_branch, B, H, N_Q)
    branch, keep = branch_tables(src_branch.to(q.device), n_src)
    token = torch.where(keep, torch.arange(N_K, device=q.device), src_token.to(q.device)).to(
        torch.int32
    )
    block_d = max(16, next_power_of_two(D))
    cfg = blocks or default_blocks(block_d)
    upcast, precision = dot_settings(q.dtype)
    out = torch.empty(B, H, N_Q, D, dtype=q.dtype, device=q.device)
    grid = (cdiv(N_Q, cfg.block_m), B * H)
    _token_replace_fwd[grid](
        q,
        k,
        v_t,
        lse,
        branch,
        token,
        out,
        *q.stride(),
        *k.stride(),
        *v_t.stride(),
        *lse.stride(),
        *out.stride(),
        n_branch,
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
