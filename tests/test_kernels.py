"""The attention kernels against float64 references that materialise P, and the chunked PyTorch path
against both.

On CPU the Triton kernels run in Triton's interpreter. The variable must be set before the first
kernel launch; minid.kernels wraps kernels with `triton.jit` lazily, so setting it here works even
when another test module imported minid first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st
from minid.kernels import chunked  # noqa: E402
from minid.kernels.dispatch import (  # noqa: E402
    attention_with_map,
    masked_multi_source,
    mutual_attention,
    token_replace,
)
from minid.kernels.flash_attention import attention_reference  # noqa: E402
from minid.kernels.multi_source import multi_source_reference  # noqa: E402
from minid.kernels.mutual import mutual_reference  # noqa: E402
from minid.kernels.runtime import interpreting, triton_available  # noqa: E402
from minid.kernels.token_replace import token_replace_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = triton_available() and (DEVICE == "cuda" or interpreting())
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])

# Max abs error allowed, relative to max |v|: the outputs are convex combinations of rows of v
# (token replacement: of at most S+1 such combinations). fp16/bf16: P and the output are rounded to
# 11/8 mantissa bits.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
LENGTHS = st.sampled_from([1, 16, 17, 64, 77, 100, 129, 200])
HEAD_DIMS = st.sampled_from([8, 24, 40, 80, 160])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
FEW = settings(max_examples=12, deadline=None)


@contextlib.contextmanager
def poisoned_outputs():
    """Make every floating buffer the wrappers allocate start as NaN, so an element never written
    shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def assert_close(found: torch.Tensor, expected: torch.Tensor, scale: float, dtype, what: str):
    assert not torch.isnan(found).any(), f"{what}: NaN in the output (an element never written?)"
    err = (found.double() - expected.double()).abs().max().item() / max(scale, 1e-12)
    assert err <= TOLERANCE[dtype], (
        f"{what}: max abs error / scale = {err:.3g} > {TOLERANCE[dtype]} ({dtype})"
    )


def test_triton_backend_is_exercised():
    """On this CPU-only machine the kernels must run in the interpreter, not silently fall back."""
    if not triton_available():
        pytest.skip("triton is not installed")
    assert TRITON_OK, "TRITON_INTERPRET=1 is not in effect on a machine without CUDA"
    q = randn(1, 1, 20, 8, dtype=torch.float32)
    with poisoned_outputs():
        out, attn_map, lse = attention_with_map(
            q, q, q, want_map=True, want_lse=True, backend="triton"
        )
    assert out.shape == (1, 1, 20, 8) and attn_map.shape == (1, 20, 20) and lse.shape == (1, 1, 20)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), n_q=LENGTHS, n_k=LENGTHS, d=HEAD_DIMS, dtype=DTYPES
)
def test_attention_with_map_matches_reference(backend, b, h, n_q, n_k, d, dtype):
    q, k, v = (
        randn(b, h, n_q, d, dtype=dtype),
        randn(b, h, n_k, d, dtype=dtype),
        randn(b, h, n_k, d, dtype=dtype),
    )
    ref_out, ref_map, ref_lse = attention_reference(q, k, v)
    with poisoned_outputs():
        out, attn_map, lse = attention_with_map(
            q, k, v, want_map=True, want_lse=True, backend=backend
        )
    assert out.dtype == dtype and attn_map.dtype == torch.float32 and lse.dtype == torch.float32
    scale = v.abs().max().item()
    assert_close(out, ref_out, scale, dtype, f"{backend} out")
    # The map and LSE are fp32 statistics of the (rounded) inputs: fp32 accuracy whatever the input
    # dtype.
    assert_close(attn_map, ref_map, 1.0, torch.float32, f"{backend} map")
    assert_close(lse, ref_lse, ref_lse.abs().max().item(), torch.float32, f"{backend} lse")
    row_sums = attn_map.double().sum(-1)
    assert (row_sums - 1).abs().max() < 1e-5, (
        f"map rows must sum to 1, found {row_sums.min()}..{row_sums.max()}"
    )


def make_weights(kind: str, n_sources: int, b: int, n_q: int, per_batch: bool) -> torch.Tensor:
    """Row weights over the sources (the last one is the target T), as the EditedID masks produce
    them."""
    shape = (b, n_q) if per_batch else (n_q,)
    w = torch.zeros(*shape, n_sources)
    if kind == "full":  # every row from source 0 (M_O covers everything)
        w[..., 0] = 1
    elif kind == "empty":  # no mask: every row is T's
        w[..., -1] = 1
    elif kind == "random":  # arbitrary distributions with exact zeros
        raw = torch.rand(*shape, n_sources) * (torch.rand(*shape, n_sources) > 0.4)
        raw[..., -1] += 1e-3
        w = raw / raw.sum(-1, keepdim=True)
    else:  # "overlap": two rectangle-like masks; rows in both get 0.5/0.5, rows in neither are T's
        start_a, start_b = n_q // 4, n_q // 2
        in_a = (torch.arange(n_q) >= start_a) & (torch.arange(n_q) < start_a + n_q // 2)
        in_b = (torch.arange(n_q) >= start_b) & (torch.arange(n_q) < start_b + n_q // 3)
        if n_sources >= 3:
            w[..., 0] = torch.where(in_a & in_b, 0.5, in_a.float())
            w[..., 1] = torch.where(in_a & in_b, 0.5, (in_b & ~in_a).float())
        elif n_sources == 2:
            w[..., 0] = in_a.float()
        w[..., -1] = 1 - w[..., :-1].sum(-1)
    w = w.movedim(-1, -2)  # (S, Nq) or (B, S, Nq)
    return w.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    n=LENGTHS,
    d=HEAD_DIMS,
    dtype=DTYPES,
    n_sources=st.integers(1, 3),
    kind=st.sampled_from(["full", "empty", "random", "overlap"]),
    mode=st.sampled_from(["map", "output"]),
    per_batch=st.booleans(),
)
def test_masked_multi_source_matches_reference(
    backend, b, h, n, d, dtype, n_sources, kind, mode, per_batch
):
    qs = [randn(b, h, n, d, dtype=dtype) for _ in range(n_sources)]
    ks = [randn(b, h, n, d, dtype=dtype) for _ in range(n_sources)]
    vs = [randn(b, h, n, d, dtype=dtype) for _ in range(n_sources)]
    weights = make_weights(kind, n_sources, b, n, per_batch)
    full_weights = weights if per_batch else weights.expand(b, *weights.shape)
    ref = multi_source_reference(qs, ks, vs, full_weights, mode=mode)
    with poisoned_outputs():
        out = masked_multi_source(qs, ks, vs, weights, mode=mode, backend=backend)
    assert out.dtype == dtype and out.shape == (b, h, n, d)
    scale = max(v.abs().max().item() for v in vs)
    assert_close(out, ref, scale, dtype, f"{backend} {mode} {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_multi_source_exact_cases(backend, dtype):
    """Full mask to O with V_T = V_O is O's attention; empty masks are T's (the EditedID
    identities)."""
    b, h, n, d = 1, 2, 77, 40
    q_o, k_o, v_o, q_e, k_e, v_e, q_t, k_t = (randn(b, h, n, d, dtype=dtype) for _ in range(8))
    qs, ks = [q_o, q_e, q_t], [k_o, k_e, k_t]
    full_o = make_weights("full", 3, b, n, per_batch=False)
    empty = make_weights("empty", 3, b, n, per_batch=False)
    o_attention, _, _ = attention_with_map(q_o, k_o, v_o, want_map=False, backend=backend)
    t_attention, _, _ = attention_with_map(q_t, k_t, v_o, want_map=False, backend=backend)
    replaced = masked_multi_source(qs, ks, [v_e, v_e, v_o], full_o, mode="map", backend=backend)
    untouched = masked_multi_source(qs, ks, [v_e, v_e, v_o], empty, mode="map", backend=backend)
    blended_output = masked_multi_source(
        qs, ks, [v_o, v_e, v_e], full_o, mode="output", backend=backend
    )
    # One code path with weight exactly 1 and skipped zero-weight sources: bit-for-bit equal.
    assert torch.equal(replaced, o_attention), (
        f"full mask, map mode: max diff {(replaced - o_attention).abs().max()}"
    )
    assert torch.equal(untouched, t_attention), (
        f"empty mask: max diff {(untouched - t_attention).abs().max()}"
    )
    assert torch.equal(blended_output, o_attention), (
        "full mask, output mode must equal O's attention"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_source_is_skipped(backend):
    """A source with zero weight on every row is never read: NaNs in its q/k/v cannot reach the
    output."""
    b, h, n, d = 1, 1, 100, 24
    qs = [randn(b, h, n, d, dtype=torch.float32) for _ in range(2)]
    ks = [randn(b, h, n, d, dtype=torch.float32) for _ in range(2)]
    vs = [randn(b, h, n, d, dtype=torch.float32) for _ in range(2)]
    qs[0] = torch.full_like(qs[0], float("nan"))
    weights = make_weights("empty", 2, b, n, per_batch=False)
    out = masked_multi_source(qs, ks, vs, weights, mode="output", backend=backend)
    assert not torch.isnan(out).any(), (
        "a zero-weight source was computed (its NaNs reached the output)"
    )


def make_selection(n_k: int, n_sources: int, fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n_k, generator=g) < fraction
    branch = torch.where(chosen, torch.randint(0, max(n_sources, 1), (n_k,), generator=g), -1)
    if n_sources == 0:
        branch = torch.full((n_k,), -1)
    token = torch.randint(0, n_k, (n_k,), generator=g)
    return branch.to(DEVICE), token.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    n_q=LENGTHS,
    n_k=st.sampled_from([1, 17, 77, 100]),
    d=HEAD_DIMS,
    dtype=DTYPES,
    n_sources=st.integers(0, 2),
    fraction=st.sampled_from([0.0, 0.2, 1.0]),
    seed=st.integers(0, 1000),
)
def test_token_replace_matches_reference(
    backend, b, h, n_q, n_k, d, dtype, n_sources, fraction, seed
):
    q_t, k_t, v_t = (
        randn(b, h, n_q, d, dtype=dtype),
        randn(b, h, n_k, d, dtype=dtype),
        randn(b, h, n_k, d, dtype=dtype),
    )
    sources = [
        (randn(b, h, n_q, d, dtype=dtype), randn(b, h, n_k, d, dtype=dtype))
        for _ in range(n_sources)
    ]
    branch, token = make_selection(n_k, n_sources, fraction, seed)
    ref = token_replace_reference(q_t, k_t, v_t, sources, branch, token)
    with poisoned_outputs():
        out = token_replace(q_t, k_t, v_t, sources, branch, token, backend=backend)
    assert out.dtype == dtype and out.shape == (b, h, n_q, d)
    assert_close(out, ref, v_t.abs().max().item(), dtype, f"{backend} token_replace")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_replace_without_tokens_is_target_attention(backend):
    b, h, n_q, n_k, d = 2, 2, 64, 77, 40
    q_t, k_t, v_t = (
        randn(b, h, n_q, d, dtype=torch.float32),
        randn(b, h, n_k, d, dtype=torch.float32),
        randn(b, h, n_k, d, dtype=torch.float32),
    )
    sources = [(randn(b, h, n_q, d, dtype=torch.float32), randn(b, h, n_k, d, dtype=torch.float32))]
    keep_all = torch.full((n_k,), -1, device=DEVICE)
    out = token_replace(
        q_t,
        k_t,
        v_t,
        sources,
        keep_all,
        torch.zeros(n_k, dtype=torch.long, device=DEVICE),
        backend=backend,
    )
    expected, _, _ = attention_with_map(q_t, k_t, v_t, want_map=False, backend=backend)
    if backend == "torch":  # the same probabilities times a column mask of ones: bit for bit
        assert torch.equal(out, expected), f"max diff {(out - expected).abs().max()}"
    else:  # exp(s - lse) in one pass against the online softmax: equal within fp32 rounding
        assert (out - expected).abs().max() <= 2e-6 * v_t.abs().max(), (
            f"max diff {(out - expected).abs().max()}"
        )
    # Taking every column from a source that is the target itself changes nothing either.
    same = token_replace(
        q_t,
        k_t,
        v_t,
        [(q_t, k_t)],
        torch.zeros(n_k, dtype=torch.long, device=DEVICE),
        torch.arange(n_k, device=DEVICE),
        backend=backend,
    )
    assert (same - expected).abs().max() <= 2e-6 * v_t.abs().max(), (
        f"max diff {(same - expected).abs().max()}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    n_q=LENGTHS,
    n_k=LENGTHS,
    d=HEAD_DIMS,
    dtype=DTYPES,
    n_sources=st.integers(1, 3),
    kind=st.sampled_from(["full", "empty", "random", "overlap"]),
    per_batch=st.booleans(),
)
def test_mutual_attention_matches_reference(
    backend, b, h, n_q, n_k, d, dtype, n_sources, kind, per_batch
):
    q = randn(b, h, n_q, d, dtype=dtype)
    ks = [randn(b, h, n_k, d, dtype=dtype) for _ in range(n_sources)]
    vs = [randn(b, h, n_k, d, dtype=dtype) for _ in range(n_sources)]
    weights = make_weights(kind, n_sources, b, n_q, per_batch)
    full_weights = weights if per_batch else weights.expand(b, *weights.shape)
    ref = mutual_reference(q, ks, vs, full_weights)
    with poisoned_outputs():
        out = mutual_attention(q, ks, vs, weights, backend=backend)
    assert out.dtype == dtype and out.shape == (b, h, n_q, d)
    scale = max(v.abs().max().item() for v in vs)
    assert_close(out, ref, scale, dtype, f"{backend} mutual {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutual_attention_special_weights(backend):
    """Equal weights: attention over the concatenated keys (MasaCtrl's mutual self-attention);
    weight 1 on one source: that source's attention; a source of weight 0 is never read."""
    b, h, n, d = 1, 2, 77, 40
    q, k_t, v_t, k_o, v_o = (randn(b, h, n, d, dtype=torch.float32) for _ in range(5))
    tol = 2e-6 * max(v_t.abs().max().item(), v_o.abs().max().item())
    both = attention_reference(q, torch.cat([k_t, k_o], 2), torch.cat([v_t, v_o], 2))[0]
    half = mutual_attention(q, [k_t, k_o], [v_t, v_o], [0.5, 0.5], backend=backend)
    assert (half.double() - both).abs().max() <= tol
    only_o = mutual_attention(q, [k_t, k_o], [v_t, v_o], [0.0, 1.0], backend=backend)
    assert (only_o.double() - attention_reference(q, k_o, v_o)[0]).abs().max() <= tol
    nan = torch.full_like(k_t, float("nan"))
    only_t = mutual_attention(q, [k_t, nan], [v_t, nan], [1.0, 0.0], backend=backend)
    assert (only_t.double() - attention_reference(q, k_t, v_t)[0]).abs().max() <= tol


@pytest.mark.skipif(
    not TRITON_OK, reason="Triton cannot run here (no CUDA, TRITON_INTERPRET unset)"
)
@settings(max_examples=6, deadline=None)
@given(n=st.sampled_from([17, 77, 130]), d=HEAD_DIMS, chunk=st.sampled_from([1, 7, 64, 256]))
def test_chunked_path_agrees_with_kernels(n, d, chunk):
    """The chunked PyTorch path at any chunk size against the Triton kernels, all three
    operations."""
    q, k, v, q2, k2 = (randn(2, 2, n, d, dtype=torch.float32) for _ in range(5))
    out_c, map_c, lse_c = chunked.attention_chunked(
        q, k, v, want_map=True, want_lse=True, chunk=chunk
    )
    out_k, map_k, lse_k = attention_with_map(
        q, k, v, want_map=True, want_lse=True, backend="triton"
    )
    assert_close(out_c, out_k, v.abs().max().item(), torch.float32, "attention")
    assert_close(map_c, map_k, 1.0, torch.float32, "map")
    assert_close(lse_c, lse_k, lse_k.abs().max().item(), torch.float32, "lse")
    weights = make_weights("overlap", 3, 2, n, per_batch=True)
    ms_c = chunked.multi_source_chunked(
        [q, q2, k], [k, k2, q], [v, q, k2], weights, mode="output", chunk=chunk
    )
    ms_k = masked_multi_source(
        [q, q2, k], [k, k2, q], [v, q, k2], weights, mode="output", backend="triton"
    )
    assert_close(
        ms_c, ms_k, max(v.abs().max(), q.abs().max(), k2.abs().max()).item(), torch.float32, "multi"
    )
    branch, token = make_selection(n, 1, 0.3, seed=n)
    tr_c = chunked.token_replace_chunked(q, k, v, [(q2, k2)], branch, token, chunk=chunk)
    tr_k = token_replace(q, k, v, [(q2, k2)], branch, token, backend="triton")
    assert_close(tr_c, tr_k, v.abs().max().item(), torch.float32, "token_replace")
    mu_c = chunked.mutual_chunked(q, [k, k2, q2], [v, q, k2], weights, chunk=chunk)
    mu_k = mutual_attention(q, [k, k2, q2], [v, q, k2], weights, backend="triton")
    assert_close(
        mu_c,
        mu_k,
        max(v.abs().max(), q.abs().max(), k2.abs().max()).item(),
        torch.float32,
        "mutual",
    )
