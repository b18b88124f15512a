"""What `minid profile` measured, as tables: the rows of the site and kernel-family tables, the
meaning of each column, and the peak rates of common GPUs that the rates are given as fractions of.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minid.kernels.accounting import OpCall
from minid.models.attention import Site


COLUMNS = """columns of the site table:
  site      transformer block (down/mid/up, level, block index) and self- or cross-attention
  res       the query grid, height x width
  Nq, Nk    query and key lengths (Nk = 77 text tokens for cross-attention)
  ops       the attention ops run at the site: sdpa (the seam's plain SDPA), fwd / fwd+map
            (attention_with_map, with the head-averaged map), multi(S) (masked_multi_source over S
            sources), token(U) (token_replace from U sources), mutual(S) (mutual_attention over S
            key sets); "2x" when run twice
  ms        time of the site per step: CPU wall time; on a GPU, between CUDA events around it
  GFLOP     analytic FLOP of the site's ops: 2*B*h*Nq*Nk*d for q k^T plus the same for P v, per
            attention (minid.kernels.accounting)
  MB        analytic bytes: every input read once and every output written once (a fused kernel's
            traffic, a lower bound)
  TFLOP/s   GFLOP / ms; GB/s: MB / ms
  step %    the site's share of the measured step
  %peak F, %peak B   (GPU) TFLOP/s and GB/s as a share of the card's peak for the dtype
below the sites: the rest of the UNet (outside the attention sites: convolutions, linear layers,
norms, other ops, and what they leave: the Python between ops on a CPU, idle and launch gaps on a
GPU) and the total, against the step measured around it in the same profiled run.
the family table: calls per step, their time, FLOP and rates, and "SDPA ms": plain
F.scaled_dot_product_attention on random inputs of the same shapes (every (q, k, v) the op reads,
stacked along the batch), timed in the same profile; "x SDPA" is the op's time over that."""


@dataclass(frozen=True)
class Card:
    """A GPU's peak rates: dense TFLOP/s (no structured sparsity) and memory bandwidth."""

    name: str
    pattern: str  # regex on torch.cuda.get_device_name()
    fp32: float  # FP32 on the CUDA cores
    fp16: float  # FP16 tensor cores, FP32 accumulate (what PyTorch's fp16 matmuls accumulate in)
    bf16: float | None  # BF16 tensor cores, FP32 accumulate
    bandwidth: float  # GB/s
    source: str

    def peak_tflops(self, dtype: torch.dtype) -> float | None:
        return {torch.float32: self.fp32, torch.float16: self.fp16, torch.bfloat16: self.bf16}.get(
            dtype
        )


# Sparsity figures of the datasheets are halved to dense ones. The first matching pattern wins.
PEAKS = (
    # NVIDIA Ada GPU Architecture whitepaper, the GeForce RTX 4090 column of its specification
    # tables: Peak FP32 82.6 TFLOPS; Peak FP16 and BF16 Tensor TFLOPS with FP32 Accumulate
    # 165.2/330.4 (dense/sparse); memory bandwidth 1008 GB/s.
    Card(
        "RTX 4090", r"RTX 4090", 82.6, 165.2, 165.2, 1008, "NVIDIA Ada GPU Architecture whitepaper"
    ),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, the GeForce RTX 3090 column: Peak FP32 35.6
    # TFLOPS; Peak FP16 and BF16 Tensor TFLOPS with FP32 Accumulate 71/142; 936 GB/s.
    Card("RTX 3090", r"RTX 3090(?! Ti)", 35.6, 71.0, 71.0, 936, "NVIDIA GA102 whitepaper"),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 NVL FP32 60 TFLOPS, FP16/BF16 Tensor Core 1,671*
    # TFLOPS (*with sparsity), 4.8 TB/s; H200 SXM FP32 67, FP16/BF16 1,979*, 4.8 TB/s.
    Card("H200 NVL", r"H200 NVL", 60.0, 835.5, 835.5, 4800, "NVIDIA H200 datasheet"),
    Card("H200 SXM", r"H200", 67.0, 989.5, 989.5, 4800, "NVIDIA H200 datasheet"),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe FP32 51 TFLOPS, FP16/BF16 1,513* TFLOPS,
    # 2 TB/s; H100 NVL FP32 60, 1,671*, 3.9 TB/s; H100 SXM FP32 67, 1,979*, 3.35 TB/s.
    Card("H100 PCIe", r"H100 PCIe", 51.0, 756.5, 756.5, 2000, "NVIDIA H100 datasheet"),
    Card("H100 NVL", r"H100 NVL", 60.0, 835.5, 835.5, 3900, "NVIDIA H100 datasheet"),
    Card("H100 SXM", r"H100", 67.0, 989.5, 989.5, 3350, "NVIDIA H100 datasheet"),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5 TFLOPS, FP16/BF16 Tensor Core 312 TFLOPS
    # (624*); 80GB PCIe 1,935 GB/s, 80GB SXM 2,039 GB/s, 40GB 1,555 GB/s.
    Card("A100 80GB PCIe", r"A100.*80GB.*PCIe", 19.5, 312.0, 312.0, 1935, "NVIDIA A100 datasheet"),
    Card("A100 80GB SXM", r"A100.*80GB", 19.5, 312.0, 312.0, 2039, "NVIDIA A100 datasheet"),
    Card("A100 40GB", r"A100", 19.5, 312.0, 312.0, 1555, "NVIDIA A100 datasheet"),
    # NVIDIA L40S datasheet: FP32 91.6 TFLOPS, FP16/BF16 Tensor Core 362.05 (733*), 864 GB/s.
    Card("L40S", r"L40S", 91.6, 362.05, 362.05, 864, "NVIDIA L40S datasheet"),
    # NVIDIA L4 datasheet: FP32 30.3 TFLOPS, FP16/BF16 Tensor Core 242* TFLOPS, 300 GB/s.
    Card("L4", r"\bL4\b", 30.3, 121.0, 121.0, 300, "NVIDIA L4 datasheet"),
    # NVIDIA A10 datasheet: FP32 31.2 TFLOPS, FP16/BF16 Tensor Core 125 (250*) TFLOPS, 600 GB/s.
    Card("A10", r"\bA10\b", 31.2, 125.0, 125.0, 600, "NVIDIA A10 datasheet"),
    # NVIDIA T4 datasheet: FP32 8.1 TFLOPS, mixed precision (FP16/FP32) 65 TFLOPS, 320 GB/s; no
    # BF16.
    Card("T4", r"\bT4\b", 8.1, 65.0, None, 320, "NVIDIA T4 datasheet"),
)


def find_card(device_name: str) -> Card | None:
    """The card of `PEAKS` a device name (torch.cuda.get_device_name) is, or None."""
    return next((c for c in PEAKS if re.search(c.pattern, device_name)), None)


@dataclass
class SiteRow:
    """One attention site: where, its shapes, the ops it ran in one step and their time per step."""

    name: str
    site: Site
    b: int
    h: int
    nq: int
    nk: int
    d: int
    ops: list[OpCall] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops)

    @property
    def ops_label(self) -> str:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[_op_label(op)] = counts.get(_op_label(op), 0) + 1
        return " ".join(f"{n}x{label}" if n > 1 else label for label, n in counts.items())


@dataclass
class FamilyRow:
    """The calls of one kernel family in a step, and plain SDPA on inputs of the same shapes."""

    op: str
    label: str
    calls: int = 0
    time_s: float = 0.0
    flops: int = 0
    bytes: int = 0
    sdpa_s: float = 0.0


@dataclass
class Profile:
    """What `profile_unet` measured, per step (the mean over the profiled steps)."""

    step: str
    attention: str
    device: str
    device_name: str
    dtype: torch.dtype
    latent: int
    rows_in_batch: int
    repeat: int
    sites: list[SiteRow]
    rest_s: float  # the step outside the attention sites
    rest_parts: dict[str, float]  # the rest by kind of op, and what the ops leave
    measured_s: float  # the step measured around it (perf_counter; CUDA events on a GPU)
    families: list[FamilyRow]
    card: Card | None
    trace: Path | None

    @property
    def total_s(self) -> float:
        """The table's own sum: the sites and the rest."""
        return sum(r.time_s for r in self.sites) + self.rest_s


def _rate(amount: float, seconds: float, scale: float) -> float:
    return amount / seconds / scale if seconds > 0 else math.nan


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def format_profile(p: Profile) -> str:
    """The two tables as text (see COLUMNS)."""
    peak_f = p.card.peak_tflops(p.dtype) if p.card else None
    peak_b = p.card.bandwidth if p.card else None
    head = ["site", "res", "Nq", "Nk", "ops", "ms", "GFLOP", "MB", "TFLOP/s", "GB/s", "step %"]
    if p.card:
        head += ["%peak F", "%peak B"]
    lines = []
    rows = []
    for r in p.sites:
        tflops, gbs = _rate(r.flops, r.time_s, 1e12), _rate(r.bytes, r.time_s, 1e9)
        row = [
            f"{r.site.block}{r.site.level}.{r.site.index} {r.site.kind}",
            f"{r.site.height}x{r.site.width}",
            str(r.nq),
            str(r.nk),
            r.ops_label,
            f"{r.time_s * 1e3:.3f}",
            _fmt(r.flops / 1e9),
            _fmt(r.bytes / 1e6),
            _fmt(tflops),
            _fmt(gbs),
            f"{100 * r.time_s / p.measured_s:.1f}",
        ]
        if p.card:
            row += [
                _fmt(100 * tflops / peak_f if peak_f else math.nan, 3),
                _fmt(100 * gbs / peak_b, 3),
            ]
        rows.append(row)

    def tail_row(label, seconds, flops=None, nbytes=None):
        row = [label, "", "", "", "", f"{seconds * 1e3:.3f}"]
        row += [_fmt(flops / 1e9) if flops else "", _fmt(nbytes / 1e6) if nbytes else ""]
        row += ["", "", f"{100 * seconds / p.measured_s:.1f}"] + ([""] * 2 if p.card else [])
        return row

    sites_s = sum(r.time_s for r in p.sites)
    flops = sum(r.flops for r in p.sites)
    nbytes = sum(r.bytes for r in p.sites)
    rows.append(tail_row(f"all {len(p.sites)} sites", sites_s, flops, nbytes))
    rows.append(tail_row("rest of the UNet", p.rest_s))
    for kind, seconds in p.rest_parts.items():
        rows.append(tail_row(f"  {kind}", seconds))
    rows.append(tail_row("total (the table's sum)", p.total_s))
    rows.append(tail_row("measured step", p.measured_s))
    lines += _table(head, rows, breaks={len(p.sites), len(p.sites) + 1}, left=(0, 4))
    diff = 100 * (p.total_s - p.measured_s) / p.measured_s
    lines.append(f"table sum {p.total_s * 1e3:.3f} ms vs measured step {p.measured_s * 1e3:.3f} ms"
                 f" ({diff:+.2f} %)")  # fmt: skip
    lines.append("")
    fhead = ["kernel family", "calls", "ms", "GFLOP", "TFLOP/s", "GB/s", "SDPA ms", "x SDPA"]
    if p.card:
        fhead += ["%peak F", "%peak B"]
    frows = []
    for f in p.families:
        if not f.calls:
            frows.append([f.label, "0"] + ["—"] * (len(fhead) - 2))
            continue
        tflops, gbs = _rate(f.flops, f.time_s, 1e12), _rate(f.bytes, f.time_s, 1e9)
        row = [
            f.label,
            str(f.calls),
            f"{f.time_s * 1e3:.3f}",
            _fmt(f.flops / 1e9),
            _fmt(tflops),
            _fmt(gbs),
            f"{f.sdpa_s * 1e3:.3f}",
            _fmt(f.time_s / f.sdpa_s if f.sdpa_s else math.nan, 3),
        ]
        if p.card:
            row += [
                _fmt(100 * tflops / peak_f if peak_f else math.nan, 3),
                _fmt(100 * gbs / peak_b, 3),
            ]
        frows.append(row)
    lines += _table(fhead, frows)
    if any(not f.calls for f in p.families):
        lines.append("— : the family did not run in this step")
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]], breaks=(), left=(0,)) -> list[str]:
    """Text columns, those in `left` left-aligned, the others right-aligned; a rule before each
    row index in `breaks`."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(head), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        if i in breaks:
            out.append("  ".join("-" * w for w in widths))
        out.append(line(row))
    return out


def describe(p: Profile) -> str:
    """The first line: what ran, where."""
    card = f", peaks of the {p.card.name} ({p.card.source})" if p.card else ""
    what = "one denoising step" if p.step == "denoise" else "one EditedID Stage 3 step"
    return (
        f"minid profile: {what}, latent {p.latent}x{p.latent}, {p.rows_in_batch} rows, "
        f"{str(p.dtype).removeprefix('torch.')}, attention {p.attention}, on {p.device_name}"
        f"{card}; mean of {p.repeat} profiled step(s)"
    )


def _op_label(call: OpCall) -> str:
    if call.op == "attention_with_map":
        return "fwd+map" if call.want_map else "fwd"
    if call.op == "masked_multi_source":
        return f"multi({call.sources})"
    if call.op == "token_replace":
        return f"token({call.sources})"
    if call.op == "mutual_attention":
        return f"mutual({call.sources})"
    return call.op
