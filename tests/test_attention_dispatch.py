"""The attention seam (minid/models/attention.py) and the ops of kernels/dispatch.py: backend
dispatch, argument checks and gradients through every path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from minid.kernels.dispatch import (
    attention_with_map,
    masked_multi_source,
    mutual_attention,
    token_replace,
)
from minid.kernels.flash_attention import attention_reference  # noqa: E402
from minid.kernels.multi_source import multi_source_reference  # noqa: E402
from minid.kernels.runtime import triton_available  # noqa: E402
from minid.kernels.token_replace import token_replace_reference  # noqa: E402

from minid.models.attention import Site, attention

SITE = Site(block="down", level=0, index=0, kind="self", height=8, width=8)


def qkv(b=1, h=2, n_q=64, n_k=64, d=8, requires_grad=False):
    tensors = [torch.randn(b, h, n, d, dtype=torch.float64) for n in (n_q, n_k, n_k)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def grads_of(fn, tensors):
    """d(Σ out·g)/d(tensors) for a fixed random cotangent g."""
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), tensors)


def test_attention_without_controller_is_sdpa_and_differentiable():
    q, k, v = qkv(requires_grad=True)
    out = attention(q, k, v, SITE)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)), (
        "attention() without a controller must be SDPA"
    )
    ours = grads_of(lambda *t: attention(*t, site=SITE), (q, k, v))
    ref = grads_of(lambda *t: attention_reference(*t)[0], (q, k, v))
    for name, a, b in zip("qkv", ours, ref):
        assert torch.allclose(a, b, atol=1e-10), (
            f"d/d{name} differs from the reference by {(a - b).abs().max()}"
        )


def test_controller_replacement_goes_through_the_seam():
    q, k, v = qkv()
    seen = {}

    def controller(q, k, v, site):
        out, attn_map, _ = attention_with_map(q, k, v)
        seen[site] = attn_map
        return out * 2

    out = attention(q, k, v, SITE, controller)
    assert torch.allclose(out, 2 * attention_reference(q, k, v)[0]), (
        "the controller's output must be returned"
    )
    assert seen[SITE].shape == (1, 64, 64), f"map shape {seen[SITE].shape}, expected (1, 64, 64)"


def test_multi_source_and_token_replace_are_differentiable():
    """Null-text optimisation backpropagates through edited attention: the default path must have
    exact grads."""
    b, h, n, d = 1, 2, 40, 8
    tensors = [torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    weights = torch.rand(2, n, dtype=torch.float64)
    weights = weights / weights.sum(0)

    def ours(q0, k0, v0, q1, k1, v1):
        return masked_multi_source([q0, q1], [k0, k1], [v0, v1], weights, mode="output")

    def ref(q0, k0, v0, q1, k1, v1):
        return multi_source_reference(
            [q0, q1], [k0, k1], [v0, v1], weights.expand(b, 2, n), mode="output"
        )

    for a, r in zip(grads_of(ours, tensors), grads_of(ref, tensors)):
        assert torch.allclose(a, r, atol=1e-10), (
            f"multi-source grad differs by {(a - r).abs().max()}"
        )

    branch = torch.tensor([-1, 0] * (n // 2))
    token = torch.arange(n).flip(0)

    def ours_tr(q_t, k_t, v_t, q_s, k_s):
        return token_replace(q_t, k_t, v_t, [(q_s, k_s)], branch, token)

    def ref_tr(q_t, k_t, v_t, q_s, k_s):
        return token_replace_reference(q_t, k_t, v_t, [(q_s, k_s)], branch, token)

    for a, r in zip(grads_of(ours_tr, tensors[:5]), grads_of(ref_tr, tensors[:5])):
        assert torch.allclose(a, r, atol=1e-10), (
            f"token-replace grad differs by {(a - r).abs().max()}"
        )


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v = (t.float() for t in qkv())
    auto = attention_with_map(q, k, v, want_lse=True)
    torch_path = attention_with_map(q, k, v, want_lse=True, backend="torch")
    for a, b in zip(auto, torch_path):
        assert torch.equal(a, b), "backend='auto' on CPU tensors must take the chunked PyTorch path"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_gradients():
    q, k, v = (t.float().requires_grad_() for t in qkv())
    with pytest.raises(ValueError, match="forward only"):
        attention_with_map(q, k, v, backend="triton")


def test_bad_arguments_have_clear_errors():
    q, k, v = (t.float() for t in qkv(n_q=10, n_k=10))
    with pytest.raises(ValueError, match="backend must be"):
        attention_with_map(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="sum to 1"):
        masked_multi_source([q, q], [k, k], [v, v], torch.full((2, 10), 0.4))
    with pytest.raises(ValueError, match="≥ 0"):
        masked_multi_source([q, q], [k, k], [v, v], torch.tensor([[1.5] * 10, [-0.5] * 10]))
    with pytest.raises(ValueError, match=r"\(S, Nq\)"):
        masked_multi_source([q, q], [k, k], [v, v], torch.full((3, 10), 1 / 3))
    with pytest.raises(ValueError, match="mode must be"):
        masked_multi_source([q], [k], [v], torch.ones(1, 10), mode="rows")
    with pytest.raises(ValueError, match="src_branch entries"):
        token_replace(q, k, v, [(q, k)], torch.full((10,), 1), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="src_token must index"):
        token_replace(q, k, v, [(q, k)], torch.zeros(10, dtype=torch.long), torch.full((10,), 10))
    with pytest.raises(ValueError, match=r"\(B, heads, N, d\)"):
        attention_with_map(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="mutual_attention: the weights of every query row"):
        mutual_attention(q, [k, k], [v, v], [0.4, 0.4])
    with pytest.raises(ValueError, match="mutual_attention: every source"):
        mutual_attention(q, [k, k[:, :, :5]], [v, v[:, :, :5]], [0.5, 0.5])


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_importing_minid_attention_does_not_import_triton():
    """Triton is imported at the first kernel launch, so TRITON_INTERPRET can still be set after
    these imports."""
    result = run_python(
        "import sys, minid.models.attention, minid.kernels.dispatch, "
        "minid.kernels.flash_attention, minid.kernels.multi_source, "
        "minid.kernels.token_replace; print('triton' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "minid.models.attention must import triton lazily"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_interpreter_variable_set_after_minid_import_still_works():
    """A process that imported minid (and the kernel modules) first can still run the kernels
    interpreted."""
    code = (
        "import os, torch\n"
        "import minid.kernels.dispatch as a, minid.kernels.flash_attention, "
        "minid.kernels.multi_source\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 2, 33, 8)\n"
        "out, _, _ = a.attention_with_map(q, q, q, want_map=False, backend='triton')\n"
        "ref, _, _ = a.attention_with_map(q, q, q, want_map=False, backend='torch')\n"
        "print(float((out - ref).abs().max()))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) < 1e-5, (
        f"interpreted kernel differs from the torch path: {result.stdout}"
    )
