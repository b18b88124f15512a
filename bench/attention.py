"""Attention editing at every SD1.4 shape: naive prompt-to-prompt against SDPA against minid's
kernels.

    python bench/attention.py            # GPU when there is one, else the CPU comparison
    python bench/attention.py --cpu      # force the CPU comparison

Methods, all on 3 branches (O, E and the target T, one image each, 8 heads):
  (a) naive   materialise each branch's map P_s = softmax(q_s k_sᵀ/sqrt(d)), edit it
              (self-attention: rows blended with mask weights; cross-attention: token columns taken
              from O and E), multiply by V_T
  (b) sdpa    F.scaled_dot_product_attention of the 3 branches, no editing (the floor)
  (c) minid   the same edits without a map: masked_multi_source(mode="map") for self-attention,
              token_replace for cross-attention (Triton on GPU, the chunked PyTorch path on CPU)
Time: median of triton.testing.do_bench on GPU, of a few wall-clock runs on CPU. Peak memory: the
peak above what the inputs already take (CUDA allocator statistics; on CPU the process's peak
resident set, reset through /proc/self/clear_refs). TFLOP/s counts the useful work of 3 unedited
attentions, 4·3·h·Nq·Nk·d, against a measured fp16/bf16 matmul rate.
Writes bench/results/attention_<device>.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from minid.kernels.dispatch import masked_multi_source, token_replace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = 8
BRANCHES = 3  # O, E, T
# (query grid side, head dim) of SD1.4's four attention resolutions for a 512×512 image.
LEVELS = [(64, 40), (32, 80), (16, 160), (8, 160)]
TEXT_TOKENS = 77


def square_mask(side: int, lo: float, hi: float) -> torch.Tensor:
    """A square region [lo, hi)² of the image at this grid side, flattened to (side·side,)."""
    r = (torch.arange(side) + 0.5) / side
    inside = (r >= lo) & (r < hi)
    return (inside[:, None] & inside[None, :]).flatten().float()


def edit_weights(side: int, device) -> torch.Tensor:
    """(3, N) row weights as EditedID builds them: a face region to O, an overlapping element region
    to E (0.5/0.5 in the overlap), T elsewhere."""
    m_o, m_e = square_mask(side, 0.25, 0.75), square_mask(side, 0.5, 0.9)
    both = m_o * m_e
    w_o = m_o - 0.5 * both
    w_e = m_e - 0.5 * both
    return torch.stack([w_o, w_e, 1 - w_o - w_e]).to(device)


def token_selection(device):
    """Target tokens 2-3 from O (identity words), 5-7 from E (element words), the rest T's."""
    branch = torch.full((TEXT_TOKENS,), -1)
    branch[2:4], branch[5:8] = 0, 1
    return branch.to(device), torch.arange(TEXT_TOKENS, device=device)


def make_case(side: int, d: int, cross: bool, dtype, device):
    n_q = side * side
    n_k = TEXT_TOKENS if cross else n_q
    g = torch.Generator(device="cpu").manual_seed(side * 1000 + d)

    def rand(n):
        return torch.randn(BRANCHES, HEADS, n, d, generator=g).to(device=device, dtype=dtype)

    return rand(n_q), rand(n_k), rand(n_k)


def naive(q, k, v, cross: bool, weights, branch, token):
    """(a): every branch's map in memory, edited, times V_T."""
    # (3, h, Nq, Nk)
    p = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
    if cross:
        # (3, Nk)
        owner = torch.nn.functional.one_hot(torch.where(branch < 0, 2, branch), BRANCHES).T.to(
            p.dtype
        )
        # column j from its owner's column token[j]
        edited = (p[..., token] * owner[:, None, None, :]).sum(0)
    else:
        edited = (weights[:, None, :, None] * p).sum(0)  # (h, Nq, Nk)
    return (edited.to(v.dtype) @ v[2]).unsqueeze(0)


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def minid_edit(q, k, v, cross: bool, weights, branch, token, backend):
    qs, ks, vs = ([t[i : i + 1] for i in range(BRANCHES)] for t in (q, k, v))
    if cross:
        return token_replace(
            qs[2], ks[2], vs[2], [(qs[0], ks[0]), (qs[1], ks[1])], branch, token, backend=backend
        )
    return masked_multi_source(qs, ks, vs, weights, mode="map", backend=backend)


def useful_flops(n_q: int, n_k: int, d: int) -> float:
    return 4.0 * BRANCHES * HEADS * n_q * n_k * d


# ---------------------------------------------------------------------------------------------- GPU
# mode
def gpu_peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_rate(dtype) -> float:
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def run_gpu() -> tuple[str, list[str]]:
    import triton
    import triton.testing

    rows = []
    columns = (
        "dtype",
        "layer",
        "Nq×Nk×d",
        "naive ms",
        "sdpa ms",
        "minid ms",
        "naive MiB",
        "sdpa MiB",
        "minid MiB",
        "minid TFLOP/s",
        "% of matmul",
        "max err minid vs naive",
    )
    header = "| " + " | ".join(columns) + " |"
    rows += [header, "|" + "---|" * 12]
    for dtype in (torch.float16, torch.bfloat16):
        peak_rate = matmul_rate(dtype)
        for side, d in LEVELS:
            for cross in (False, True):
                q, k, v = make_case(side, d, cross, dtype, "cuda")
                weights = edit_weights(side, "cuda")
                branch, token = token_selection("cuda")
                fns = {
                    "naive": lambda: naive(q, k, v, cross, weights, branch, token),
                    "sdpa": lambda: sdpa(q, k, v),
                    "minid": lambda: minid_edit(q, k, v, cross, weights, branch, token, "triton"),
                }
                with torch.no_grad():
                    ms = {
                        name: triton.testing.do_bench(fn, return_mode="median")
                        for name, fn in fns.items()
                    }
                    mib = {name: gpu_peak(fn) for name, fn in fns.items()}
                    err = (fns["minid"]().float() - fns["naive"]().float()).abs().max().item()
                n_q, n_k = q.shape[2], k.shape[2]
                tflops = useful_flops(n_q, n_k, d) / (ms["minid"] * 1e-3) / 1e12
                kind = "cross" if cross else "self"
                rows.append(
                    f"| {str(dtype)[6:]} | {side}² {kind} | {n_q}×{n_k}×{d} | {ms['naive']:.3f} | "
                    f"{ms['sdpa']:.3f} | {ms['minid']:.3f} | {mib['naive']:.1f} | "
                    f"{mib['sdpa']:.1f} | "
                    f"{mib['minid']:.1f} | {tflops:.1f} | {100 * tflops / peak_rate:.0f}% | "
                    f"{err:.2e} |"
                )
                print(rows[-1], flush=True)
        rows.append(f"\nMeasured {str(dtype)[6:]} matmul rate (8192³): {peak_rate:.0f} TFLOP/s\n")
        rows += [header, "|" + "---|" * 12] if dtype == torch.float16 else []
    device = torch.cuda.get_device_name()
    env = (
        f"GPU: {device}; torch {torch.__version__}; triton {triton.__version__}; "
        f"CUDA {torch.version.cuda}"
    )
    return device, [env] + rows


# ---------------------------------------------------------------------------------------------- CPU
# mode
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(
        f"bench/attention.py: {field} not in /proc/self/status (CPU peak memory needs Linux)"
    )


def cpu_peak(fn) -> float:
    """Peak resident memory above the current level while fn runs, in MiB."""
    # hand freed heap pages back to the system, or reusing them would not show in the resident set
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the resident-set high-water mark
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def cpu_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_cpu() -> tuple[str, list[str]]:
    # CPU half-precision matmuls are emulated and slow; fp32 is what a CPU user runs
    dtype = torch.float32
    rows = [
        "| layer | Nq×Nk×d | naive ms | sdpa ms | minid (chunked) ms | naive MiB | sdpa MiB | "
        "minid MiB | max err |",
        "|" + "---|" * 9,
    ]
    for side, d in LEVELS:
        for cross in (False, True):
            q, k, v = make_case(side, d, cross, dtype, "cpu")
            weights = edit_weights(side, "cpu")
            branch, token = token_selection("cpu")
            fns = {
                "naive": lambda: naive(q, k, v, cross, weights, branch, token),
                "sdpa": lambda: sdpa(q, k, v),
                "minid": lambda: minid_edit(q, k, v, cross, weights, branch, token, "torch"),
            }
            with torch.no_grad():
                mib = {name: cpu_peak(fn) for name, fn in fns.items()}
                ms = {name: cpu_time(fn) for name, fn in fns.items()}
                err = (fns["minid"]() - fns["naive"]()).abs().max().item()
            kind = "cross" if cross else "self"
            rows.append(
                f"| {side}² {kind} | {q.shape[2]}×{k.shape[2]}×{d} | {ms['naive']:.1f} | "
                f"{ms['sdpa']:.1f} | "
                f"{ms['minid']:.1f} | {mib['naive']:.1f} | {mib['sdpa']:.1f} | {mib['minid']:.1f} "
                f"| {err:.1e} |"
            )
            print(rows[-1], flush=True)
    cpu = platform.processor() or platform.machine()
    env = (
        f"CPU: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; fp32; "
        f"3 branches × 1 image × 8 heads"
    )
    return "cpu", [env] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="run the CPU comparison even when a GPU is present"
    )
    args = parser.parse_args()
    use_gpu = torch.cuda.is_available() and not args.cpu
    device, lines = run_gpu() if use_gpu else run_cpu()
    date = datetime.date.today().isoformat()
    name = "cpu" if device == "cpu" else device.lower().replace(" ", "_").replace("nvidia_", "")
    text = "\n".join(
        [
            f"# Attention editing benchmark ({device})",
            "",
            f"{date}; python {sys.version.split()[0]}; " + lines[0],
            "",
            __doc__.split("\n\n", 2)[2].strip(),
            "",
            *lines[1:],
            "",
        ]
    )
    config = {
        "args": vars(args),
        "device": device,
        "mode": "gpu" if use_gpu else "cpu",
        "dtypes": ["float16", "bfloat16"] if use_gpu else ["float32"],
        "backend": "triton" if use_gpu else "torch",
        "heads": HEADS,
        "branches": BRANCHES,
        "levels": [{"side": side, "head_dim": d} for side, d in LEVELS],
        "text_tokens": TEXT_TOKENS,
        "timing": "triton.testing.do_bench median" if use_gpu else "median of 3 wall-clock runs",
        "matmul_rate_side": 8192 if use_gpu else None,
        "threads": torch.get_num_threads(),
    }
    write_results(RESULTS / f"attention_{name}.md", text, config)


if __name__ == "__main__":
    main()
