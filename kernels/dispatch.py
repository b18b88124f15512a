"""The attention ops a controller calls at the seam of `minid.models.attention`.

What a controller can call here instead of materialising attention maps (all forward-exact rewrites;
see kernels/ for the math and the kernels):

- `attention_with_map`: the output plus, on request, the head-averaged map (B, Nq, Nk) and the row
  log-sum-exp (B, h, Nq), for attention stores, local blend and visualisation.
- `masked_multi_source`: per query row, a mix of several branches' attention with weights from masks
  (EditedID's mask-selective self-attention replacement), mode "map" or "output".
- `token_replace`: the target's cross-attention map with chosen token columns taken from other
  branches.
- `mutual_attention`: one branch's queries over several branches' keys and values together, each
  key set with a prior weight (mutual self-attention over [K_T; K_O]; minid's mask-free mode).

Each dispatches (`backend="auto"`) to the Triton kernels of minid.kernels for CUDA tensors when
Triton is installed and no gradient is needed, and otherwise to the chunked PyTorch path
(kernels/chunked.py), which has the same semantics, bounded memory and a backward.
`backend="triton"` or `"torch"` forces one (tests, benchmarks); Triton on CPU tensors needs
`TRITON_INTERPRET=1` set before the first kernel launch.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch

from . import chunked
from .accounting import op_range
from .runtime import triton_available, triton_can_run

Backend = Literal["auto", "triton", "torch"]
BACKENDS = get_args(Backend)

# How far a row of masked_multi_source's weights may be from summing to 1: masks resized to an
# attention resolution by interpolation in fp32 or fp16 carry rounding of about 1e-3 at worst.
WEIGHT_SUM_TOLERANCE = 2e-3


def _needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _use_triton(backend: Backend, tensors: Sequence[torch.Tensor], caller: str) -> bool:
    """Whether `caller` runs the Triton kernels: on "auto", for CUDA tensors when no gradient is
    needed."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_can_run(*tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"{caller}: backend='triton' needs Triton and CUDA tensors, or CPU "
                f"tensors with TRITON_INTERPRET=1 set before the first kernel launch; found "
                f"devices "
                f"{devices}, triton installed: {triton_available()}. Use backend='torch' or 'auto'."
            )
        if _needs_grad(tensors):
            raise ValueError(
                f"{caller}: the Triton kernels are forward only, but an input "
                f"requires grad; use backend='auto' (it takes the PyTorch path) or torch.no_grad()."
            )
        return True
    if backend != "auto":
        raise ValueError(
            f"{caller}: backend must be 'auto', 'triton' or 'torch', found {backend!r}"
        )
    return all(t.is_cuda for t in tensors) and triton_available() and not _needs_grad(tensors)


def _check_qkv(caller: str, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{caller}: {name} q, k, v must be (B, heads, N, d); found shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (
        q.shape[:2] != k.shape[:2]
        or k.shape[:3] != v.shape[:3]
        or q.shape[-1] != k.shape[-1]
        or v.shape[-1] != q.shape[-1]
    ):
        raise ValueError(
            f"{caller}: {name} q (B, h, Nq, d), k and v (B, h, Nk, d) do not agree; "
            f"found {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def attention_with_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    want_map: bool = True,
    want_lse: bool = False,
    backend: Backend = "auto",
):
    """Attention that also exposes what the softmax computed.

    (B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, d) -> (out (B, h, Nq, d) in q's dtype,
    map (B, Nq, Nk) fp32 = softmax(q kᵀ/sqrt(d)) averaged over heads, or None,
    lse (B, h, Nq) fp32 = log Σ_j exp(q·k_j/sqrt(d)), or None).
    The map of a 64×64 self-attention layer is 64 MiB per image: ask for maps of cross-attention.
    """
    _check_qkv("attention_with_map", "", q, k, v)
    with op_range("attention_with_map", q, k, v, want_map=want_map, want_lse=want_lse):
        if _use_triton(backend, (q, k, v), "attention_with_map"):
            from .flash_attention import attention_triton

            return attention_triton(q, k, v, want_map=want_map, want_lse=want_lse)
        return chunked.attention_chunked(q, k, v, want_map=want_map, want_lse=want_lse)


def _normalise_weights(
    weights: torch.Tensor,
    num_sources: int,
    batch: int,
    n_q: int,
    caller: str = "masked_multi_source",
) -> torch.Tensor:
    """weights (S, Nq) or (B, S, Nq) -> (B, S, Nq), after checking they are per-row
    distributions."""
    if weights.dim() == 2:
        # shared by every batch element
        weights = weights.unsqueeze(0).expand(batch, *weights.shape)
    if weights.dim() != 3 or tuple(weights.shape) != (batch, num_sources, n_q):
        raise ValueError(
            f"{caller}: weights must be (S, Nq) = ({num_sources}, {n_q}) "
            f"or (B, S, Nq) = ({batch}, {num_sources}, {n_q}); found {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        weights = weights.float()  # bool or integer masks
    if bool((weights < 0).any()):
        raise ValueError(
            f"{caller}: weights must be ≥ 0; found minimum "
            f"{weights.min().item():.4g}. Build them from masks in [0, 1]."
        )
    sums = weights.sum(dim=1)  # (B, Nq)
    worst = (sums - 1).abs().flatten().argmax()
    if float((sums - 1).abs().flatten()[worst]) > WEIGHT_SUM_TOLERANCE:
        b, p = divmod(int(worst), n_q)
        raise ValueError(
            f"{caller}: the weights of every query row must sum to 1 "
            f"over the {num_sources} sources (within {WEIGHT_SUM_TOLERANCE}); found "
            f"{float(sums[b, p]):.6g} at batch {b}, row {p}. Give the target the rest, "
            f"w_T = 1 - Σ_others, so that blended rows stay distributions."
        )
    return weights


def masked_multi_source(
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    mode: Literal["map", "output"] = "output",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per query row p, a weighted mix of the sources' attention, without writing any map.

    mode "map":    out[p] = Σ_s w_s(p) softmax(q_s k_sᵀ/sqrt(d))[p] V_T   (V_T = vs[-1]; the other
    vs unused) mode "output": out[p] = Σ_s w_s(p) softmax(q_s k_sᵀ/sqrt(d))[p] V_s
    qs, ks, vs: S tensors each (B, h, N, d), the same shapes for all sources; weights (S, Nq) or (B,
    S, Nq), each row a distribution over the sources (from masks at this resolution). Returns (B, h,
    Nq, d).
    """
    if mode not in ("map", "output"):
        raise ValueError(f"masked_multi_source: mode must be 'map' or 'output', found {mode!r}")
    if not (len(qs) == len(ks) == len(vs)) or len(qs) == 0:
        raise ValueError(
            f"masked_multi_source: qs, ks, vs must be lists of the same length "
            f"S ≥ 1; found {len(qs)}, {len(ks)}, {len(vs)}"
        )
    for s, (q, k, v) in enumerate(zip(qs, ks, vs)):
        _check_qkv("masked_multi_source", f"source {s}:", q, k, v)
        if q.shape != qs[0].shape or k.shape != ks[0].shape or v.shape != vs[0].shape:
            raise ValueError(
                f"masked_multi_source: every source must have source 0's shapes "
                f"{tuple(qs[0].shape)}, {tuple(ks[0].shape)}; source {s} has {tuple(q.shape)}, "
                f"{tuple(k.shape)}"
            )
    B, _, N_Q, _ = qs[0].shape
    with op_range("masked_multi_source", qs[0], ks[0], vs[0], sources=len(qs), mode=mode):
        weights = _normalise_weights(weights.to(qs[0].device), len(qs), B, N_Q)
        tensors = [*qs, *ks, *(vs[-1:] if mode == "map" else vs)]
        if _use_triton(backend, tensors, "masked_multi_source"):
            from .multi_source import multi_source_triton

            return multi_source_triton(list(qs), list(ks), list(vs), weights, mode=mode)
        return chunked.multi_source_chunked(qs, ks, vs, weights, mode=mode)


def token_replace(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    src_branch: torch.Tensor,
    src_token: torch.Tensor,
    backend: Backend = "auto",
) -> torch.Tensor:
    """T's cross-attention with chosen token columns of the map taken from other branches, times T's
    values.

    P'[:, j] = P_T[:, j] where src_branch[j] = -1, else P_i[:, src_token[j]] with i = src_branch[j]
    and P_i = softmax(q_i k_iᵀ/sqrt(d)) of sources[i] = (q_i, k_i); out = P' V_T. P' is not
    renormalised (prompt-to-prompt's replacement). q_t (B, h, Nq, d), k_t and v_t (B, h, Nk, d),
    every source the same shapes as (q_t, k_t); src_branch and src_token LongTensors (Nk,). Returns
    (B, h, Nq, d).
    """
    _check_qkv("token_replace", "target", q_t, k_t, v_t)
    for i, (q_s, k_s) in enumerate(sources):
        if q_s.shape != q_t.shape or k_s.shape != k_t.shape:
            raise ValueError(
                f"token_replace: source {i} (q, k) must have the target's shapes "
                f"{tuple(q_t.shape)}, {tuple(k_t.shape)}; found {tuple(q_s.shape)}, "
                f"{tuple(k_s.shape)}"
            )
    n_k = k_t.shape[2]
    if tuple(src_branch.shape) != (n_k,) or tuple(src_token.shape) != (n_k,):
        raise ValueError(
            f"token_replace: src_branch and src_token must be ({n_k},), one entry per "
            f"target token; found {tuple(src_branch.shape)}, {tuple(src_token.shape)}"
        )
    src_branch = src_branch.long()
    src_token = src_token.long()
    if bool(((src_branch < -1) | (src_branch >= len(sources))).any()):
        raise ValueError(
            f"token_replace: src_branch entries must be -1 (keep the target's column) "
            f"or a source index 0..{len(sources) - 1}; found {sorted(set(src_branch.tolist()))}"
        )
    taken = src_token[src_branch >= 0]
    if bool(((taken < 0) | (taken >= n_k)).any()):
        raise ValueError(
            f"token_replace: src_token must index the source's {n_k} tokens where "
            f"src_branch ≥ 0; found {sorted(set(taken.tolist()))}"
        )
    tensors = [q_t, k_t, v_t, *[t for pair in sources for t in pair]]
    with op_range("token_replace", q_t, k_t, v_t, sources=len(sources)):
        if _use_triton(backend, tensors, "token_replace"):
            from .token_replace import token_replace_triton

            return token_replace_triton(q_t, k_t, v_t, list(sources), src_branch, src_token)
        return chunked.token_replace_chunked(q_t, k_t, v_t, sources, src_branch, src_token)


def mutual_attention(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    backend: Backend = "auto",
) -> torch.Tensor:
    """The queries q over the keys and values of S sources together, source s with prior weight
    π_s(p) on query row p:

        out[p] = Σ_s π_s(p) Σ_j e^(q_p·k_sj/sqrt(d)) v_sj / Σ_s π_s(p) Σ_j e^(q_p·k_sj/sqrt(d)),

    softmax over [k_0; k_1; …] with log π_s added to source s's logits, times [v_0; v_1; …]
    (kernels/mutual.py). Equal weights: plain attention over the concatenation. q (B, h, Nq, d);
    ks, vs: S tensors each (B, h, Nk, d), one shape for all; weights (S,), (S, Nq) or (B, S, Nq),
    each row a distribution over the sources. Returns (B, h, Nq, d).
    """
    if not (len(ks) == len(vs)) or len(ks) == 0:
        raise ValueError(
            f"mutual_attention: ks and vs must be lists of the same length S ≥ 1; found "
            f"{len(ks)}, {len(vs)}"
        )
    for s, (k, v) in enumerate(zip(ks, vs)):
        _check_qkv("mutual_attention", f"source {s}:", q, k, v)
        if k.shape != ks[0].shape or v.shape != vs[0].shape:
            raise ValueError(
                f"mutual_attention: every source must have source 0's shapes "
                f"{tuple(ks[0].shape)}; source {s} has {tuple(k.shape)}, {tuple(v.shape)}"
            )
    B, _, N_Q, _ = q.shape
    weights = torch.as_tensor(weights, dtype=torch.float32, device=q.device)
    if weights.dim() == 1:
        weights = weights[:, None].expand(len(ks), N_Q)
    weights = _normalise_weights(weights, len(ks), B, N_Q, "mutual_attention")
    with op_range("mutual_attention", q, ks[0], vs[0], sources=len(ks)):
        if _use_triton(backend, [q, *ks, *vs], "mutual_attention"):
            from .mutual import mutual_triton

            return mutual_triton(q, list(ks), list(vs), weights)
        return chunked.mutual_chunked(q, ks, vs, weights)
