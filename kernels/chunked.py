"""The PyTorch path of the attention kernels: the same three operations, chunked over query rows.

This is what runs on CPU, without Triton, and whenever autograd needs a backward (null-text
optimisation differentiates through the UNet; the Triton kernels are forward only). It has the
semantics of the kernels beside it (kernels/flash_attention.py, multi_source.py, token_replace.py)
and bounded memory: at most QUERY_CHUNK rows of scores and probabilities exist at a time, so a
4096×4096 map per head is never built.

Numerics: fp16/bf16 inputs are computed in fp32 (CPU half matmuls are slow and the kernels
accumulate in fp32 too) and the output is cast back; float64 inputs stay float64. The map and the
LSE are returned in fp32. Under autograd each chunk's probabilities are saved for the backward, so
memory is bounded in the forward only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Query rows per chunk. Scores and probabilities of a chunk take 2 · B·h·QUERY_CHUNK·Nk · 4 bytes:
# for three branches × 8 heads against 4096 keys that is 200 MiB, against 256 MiB per head for one
# full fp32 map.
QUERY_CHUNK = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(q_rows: torch.Tensor, k: torch.Tensor):
    """softmax(q kᵀ / sqrt(d)) for a chunk of rows and its row log-sum-exp: (B, h, c, Nk), (B, h,
    c)."""
    compute = _compute_dtype(q_rows.dtype)
    # (B, h, c, Nk)
    scores = q_rows.to(compute) @ k.to(compute).transpose(-1, -2) / math.sqrt(q_rows.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)  # (B, h, c)
    return torch.exp(scores - lse[..., None]), lse


def attention_chunked(
    q, k, v, want_map: bool = False, want_lse: bool = False, chunk: int = QUERY_CHUNK
):
    """(out (B, h, Nq, d) in q's dtype, head-averaged map (B, Nq, Nk) fp32 | None, lse (B, h, Nq)
    fp32 | None)."""
    if not want_map and not want_lse:
        # Only the output: PyTorch's fused SDPA, the same bits as the unedited attention of the
        # UNet.
        return F.scaled_dot_product_attention(q, k, v), None, None
    outs, maps, lses = [], [], []
    for start in range(0, q.shape[2], chunk):
        p, lse = _probs(q[:, :, start : start + chunk], k)  # (B, h, c, Nk)
        outs.append((p @ v.to(p.dtype)).to(q.dtype))  # (B, h, c, d)
        if want_map:
            maps.append(p.mean(dim=1).float())  # (B, c, Nk)
        if want_lse:
            lses.append(lse.float())
    return (
        torch.cat(outs, dim=2),
        torch.cat(maps, dim=1) if want_map else None,
        torch.cat(lses, dim=2) if want_lse else None,
    )


def multi_source_chunked(
    qs, ks, vs, weights: torch.Tensor, mode: str = "output", chunk: int = QUERY_CHUNK
):
    """Σ_s w_s(p) softmax(q_s k_sᵀ)[p] V (V = the last source's v in mode "map", v_s in mode
    "output").

    weights (B, S, Nq). Because the edit is linear in V, each source's term is one plain attention,
    softmax(q_s k_sᵀ) V, which PyTorch's fused SDPA computes with bounded memory (and a backward);
    only the (B, h, Nq, d) outputs are weighted and summed. A source whose weights are zero
    everywhere is skipped. A source with weight 1 on every row therefore gives exactly
    `F.scaled_dot_product_attention`'s bits, the same as the unedited attention of that branch.
    `chunk` is kept for the signature; SDPA does its own tiling.
    """
    B, H, N_Q, D = qs[0].shape
    compute = _compute_dtype(qs[0].dtype)
    acc = torch.zeros(B, H, N_Q, vs[-1].shape[-1], dtype=compute, device=qs[0].device)
    for s in range(len(qs)):
        w = weights[:, s]  # (B, Nq)
        if not bool((w != 0).any()):
            continue
        v = vs[-1] if mode == "map" else vs[s]
        out_s = F.scaled_dot_product_attention(qs[s], ks[s], v.to(qs[s].dtype))  # (B, h, Nq, d)
        # (Σ_s w_s P_s) V = Σ_s w_s (P_s V): weight the normalised output rows, never the map.
        acc = acc + w[:, None, :, None].to(compute) * out_s.to(compute)
    return acc.to(qs[0].dtype)


def token_replace_chunked(
    q_t,
    k_t,
    v_t,
    sources,
    src_branch: torch.Tensor,
    src_token: torch.Tensor,
    chunk: int = QUERY_CHUNK,
):
    """P'[:, j] = P_T[:, j] (src_branch[j] = -1) or P_i[:, src_token[j]] (src_branch[j] = i); out =
    P' V_T."""
    src_branch = src_branch.to(q_t.device)
    src_token = src_token.to(q_t.device)
    keep = (src_branch < 0).to(_compute_dtype(q_t.dtype))  # (Nk,) 1 where T keeps its own column
    used = sorted(set(src_branch[src_branch >= 0].tolist()))
    if not used:
        # No column replaced: P' = P_T, plain attention (the same bits as the unedited branch).
        return F.scaled_dot_product_attention(q_t, k_t, v_t)
    outs = []
    for start in range(0, q_t.shape[2], chunk):
        rows = slice(start, start + chunk)
        p_t, _ = _probs(q_t[:, :, rows], k_t)  # (B, h, c, Nk)
        # Multiplying by 0/1 column masks and adding is exact, so with no token replaced P' is P_T
        # bit for bit.
        edited = p_t * keep
        for i in used:
            q_s, k_s = sources[i]
            p_s, _ = _probs(q_s[:, :, rows], k_s)  # (B, h, c, Nk_s)
            owned = (src_branch == i).to(p_t.dtype)  # (Nk,)
            # column j ← P_i[:, src_token[j]]
            edited = edited + p_s[..., src_token.clamp(0, k_s.shape[2] - 1)] * owned
        outs.append((edited @ v_t.to(edited.dtype)).to(q_t.dtype))
    return torch.cat(outs, dim=2)


def mutual_chunked(q, ks, vs, weights: torch.Tensor, chunk: int = QUERY_CHUNK):
    """softmax over the concatenated keys [k_0; k_1; …] with log π_s(p) added to source s's logits,
    times [v_0; v_1; …] (kernels/mutual.py). weights (B, S, Nq). A source whose weights are zero
    everywhere is left out of the concatenation (never read)."""
    compute = _compute_dtype(q.dtype)
    used = [s for s in range(len(ks)) if bool((weights[:, s] != 0).any())]
    k = torch.cat([ks[s] for s in used], dim=2).to(compute)  # (B, h, S'·Nk, d)
    v = torch.cat([vs[s] for s in used], dim=2).to(compute)
    n_k = ks[0].shape[2]
    # (B, 1, Nq, S'·Nk): each source's log-weight over its columns (log 0 = −∞: no mass)
    bias = torch.log(weights[:, used].to(compute)).repeat_interleave(n_k, dim=1)
    bias = bias.transpose(1, 2)[:, None]
    outs = []
    for start in range(0, q.shape[2], chunk):
        rows = slice(start, start + chunk)
        scores = q[:, :, rows].to(compute) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        p = torch.softmax(scores + bias[:, :, rows], dim=-1)
        outs.append((p @ v).to(q.dtype))
    return torch.cat(outs, dim=2)
