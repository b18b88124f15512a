"""`minid profile`: one UNet step under torch.profiler, read per attention site.

The UNet (SD1.4's size or the tiny test size, random weights: the work does not depend on the
values) runs one denoising step or one EditedID Stage 3 step at a chosen latent size, batch, dtype
and attention backend. Each attention site is wrapped in a profiler range by a controller at the
seam (`minid.site down0.0 self 64x64`), and each attention op inside it opens its own range naming
its shapes (minid.kernels.accounting). The profile is written as a Chrome trace and read back into
two tables: one row per site with its time, FLOP and bytes (analytic, from the op's shapes), the
rates they give and the site's share of the step, then the rest of the UNet; and the totals of the
three kernel families (fused forward with map, masked multi-source, token-select; and mutual
self-attention, the mask-free mode's) against plain SDPA on inputs of the same shapes.

Times: on a CPU the ranges' wall time, and the step measured by perf_counter around it; on a GPU
CUDA events recorded around each site and each step (the GPU's time, its idle gaps included), and
the kernel families' time as torch.profiler's device time of their kernels. The rest of the UNet is
the step outside the sites, broken down by the top-level ops the profiler saw there; on a CPU the
Python between ops, on a GPU the idle and launch gaps, are what the ops leave. On a GPU each rate is
also given as a fraction of the card's peak (`PEAKS`, from the vendors' datasheets).
"""

from __future__ import annotations

import gc
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from minid.app.profile_report import (
    FamilyRow,
    Profile,
    SiteRow,
    describe,
    find_card,
    format_profile,
)
from minid.kernels.accounting import OpCall
from minid.models.attention import Site, default_attention

STEPS = ("denoise", "stage3")
ATTENTION = ("sdpa", "auto", "torch", "triton")
MAPS = ("none", "cross", "all")
SITE_PREFIX = "minid.site "
STEP_RANGE = "minid.profile.step"
BASELINE_PREFIX = "minid.profile.sdpa_baseline "
FAMILIES = (
    ("attention_with_map", "fused forward with map"),
    ("masked_multi_source", "masked multi-source"),
    ("token_replace", "token-select"),
    ("mutual_attention", "mutual self-attention"),  # the mask-free mode
)


# ---- the cards' peaks ----------------------------------------------------------------------------


# ---- what a profile holds ------------------------------------------------------------------------


# ---- the controllers -----------------------------------------------------------------------------


def site_name(site: Site) -> str:
    return f"{site.block}{site.level}.{site.index} {site.kind} {site.height}x{site.width}"


class SiteRanges:
    """A controller that opens a profiler range around each site's attention (`inner`'s, or the
    seam's SDPA when `inner` is None or returns None) and notes each site's shapes; with `cuda`,
    it also records CUDA events around each site (`cuda_seconds` reads them)."""

    def __init__(self, inner=None, cuda: bool = False):
        self.inner = inner
        self.cuda = cuda
        self.seen: dict[str, tuple[Site, tuple, tuple]] = {}
        self.events: dict[str, list] = defaultdict(list)

    def __call__(self, q, k, v, site: Site, step: int | None = None):
        name = site_name(site)
        self.seen.setdefault(name, (site, tuple(q.shape), tuple(k.shape)))
        with torch.profiler.record_function(SITE_PREFIX + name):
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
            out = None if self.inner is None else self.inner(q, k, v, site, step=step or 0)
            out = default_attention(q, k, v) if out is None else out
            if self.cuda:
                end.record()
                self.events[name].append((start, end))
            return out

    def cuda_seconds(self) -> dict[str, float]:
        """Each site's GPU time summed over the calls since the last `events.clear()` (after a
        synchronize)."""
        return {n: sum(a.elapsed_time(b) for a, b in ev) / 1e3 for n, ev in self.events.items()}


class MapAttention:
    """Every site through `attention_with_map` on `backend`, asking for the head-averaged map at
    the sites `maps` names ("none", "cross" — what an attention store keeps — or "all")."""

    def __init__(self, backend: str, maps: str):
        self.backend, self.maps = backend, maps

    def __call__(self, q, k, v, site: Site, step: int = 0):
        from minid.kernels.dispatch import attention_with_map

        want = self.maps == "all" or (self.maps == "cross" and site.is_cross)
        return attention_with_map(q, k, v, want_map=want, backend=self.backend)[0]


def _disc(side: int, cy: float, cx: float, r: float, device) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    inside = ((y / side - cy) ** 2 + (x / side - cx) ** 2) <= r**2
    return inside.float()[None, None].to(device)


def stage3_controller(images: int, side: int, guided: bool, backend: str, mode: str, device):
    """Stage 3's gating for `images` (O, E, T) triples in one batch: O's face a disc, E's a shifted
    disc overlapping it (every case of Eq. 8 occurs), two identity and two element tokens."""
    from minid.method.control import BatchLayout
    from minid.method.gating import EditedIDGating, GatingConfig, GatingGroup

    layout = BatchLayout(3 * images, cfg=guided)
    mask_o = _disc(side, 0.45, 0.5, 0.25, device)
    mask_e = _disc(side, 0.6, 0.55, 0.2, device)
    return GatingGroup(
        [
            EditedIDGating(
                layout,
                mask_o,
                mask_e,
                id_tokens=[(1, 1), (2, 2)],
                element_tokens=[(4, 4), (5, 5)],
                config=GatingConfig(mode=mode),
                backend=backend,
                branch_o=i,
                branch_e=images + i,
                branch_t=2 * images + i,
            )
            for i in range(images)
        ]
    )


# ---- reading the profile -------------------------------------------------------------------------


def _cpu_events(prof):
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CPU]


def _seconds(event, on_gpu: bool) -> float:
    if on_gpu:
        return getattr(event, "device_time_total", 0.0) / 1e6
    return event.time_range.elapsed_us() / 1e6


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _rest_kind(name: str) -> str:
    if "conv" in name:
        return "convolutions"
    if name in ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"):
        return "linear layers"
    if "norm" in name:
        return "norms"
    return "other ops"


def _sdpa_call(event, itemsize: int) -> OpCall | None:
    """The OpCall of a plain aten SDPA a controller ran itself (not through the seam's or the
    kernels' ops), from the shapes the profiler recorded."""
    shapes = getattr(event, "input_shapes", None) or []
    if len(shapes) < 3 or any(len(s) != 4 for s in shapes[:3]):
        return None
    (b, h, nq, d), (_, _, nk, _), v = shapes[:3]
    return OpCall("sdpa", b, h, nq, nk, d, v[3], itemsize)


def _read(prof, on_gpu: bool, itemsize: int):
    """(site time totals {name: s}, ops of the first step {name: [OpCall]}, rest total, rest parts,
    step total (device time on a GPU), calls per family op {op: [(OpCall, s)]} over all steps,
    baseline times {range name: [s]}), summed over the profiled steps."""
    events = _cpu_events(prof)
    steps = sorted((e for e in events if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
    first = steps[0] if steps else None
    site_time: dict[str, float] = defaultdict(float)
    site_ops: dict[str, list[OpCall]] = defaultdict(list)
    family: dict[str, list[tuple[OpCall, float]]] = defaultdict(list)
    baseline: dict[str, list[float]] = defaultdict(list)
    rest_parts: dict[str, float] = defaultdict(float)
    step_total = sum(_seconds(s, on_gpu) for s in steps)
    for e in events:
        if e.name.startswith(BASELINE_PREFIX):
            baseline[e.name[len(BASELINE_PREFIX) :]].append(_seconds(e, on_gpu))
            continue
        parents = list(_ancestors(e))
        in_step = next((p for p in parents if p.name == STEP_RANGE), None)
        if in_step is None:
            continue
        if e.name.startswith(SITE_PREFIX):
            site_time[e.name[len(SITE_PREFIX) :]] += _seconds(e, on_gpu)
            continue
        if e.cpu_parent is in_step:  # a top-level op of the step outside every site
            rest_parts[_rest_kind(e.name)] += _seconds(e, on_gpu)
            continue
        call = OpCall.parse(e.name)
        if call is None and e.name == "aten::scaled_dot_product_attention":
            call = _sdpa_call(e, itemsize)
        if call is None:
            continue
        # the nearest minid range above it: a site (counted), or another op (nested: skipped)
        above = next(
            (p for p in parents if p.name.startswith(SITE_PREFIX) or OpCall.parse(p.name)), None
        )
        if above is None or not above.name.startswith(SITE_PREFIX):
            continue
        if in_step is first:
            site_ops[above.name[len(SITE_PREFIX) :]].append(call)
        family[call.op].append((call, _seconds(e, on_gpu)))
    return site_time, site_ops, rest_parts, step_total, family, baseline


# ---- running a step under the profiler -----------------------------------------------------------


def _baseline_inputs(call: OpCall, dtype, device):
    """Random (q, k, v) of the shapes the op reads, stacked along the batch: one SDPA doing the
    op's attentions without the edit or the map."""
    rows = call.b * (call.attentions if call.op != "token_replace" else 1 + call.sources)
    nk = call.nk
    if call.op == "mutual_attention":  # the queries over the S key sets together
        rows, nk = call.b, call.nk * call.sources
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(n, d):
        return torch.randn(rows, call.h, n, d, generator=g).to(device, dtype)

    return rand(call.nq, call.d), rand(nk, call.d), rand(nk, call.dv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_unet(
    unet_config=None,
    latent: int | None = None,
    images: int = 1,
    guided: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention: str = "auto",
    maps: str = "cross",
    step: str = "denoise",
    gating_mode: str = "output",
    repeat: int = 1,
    warmup: int = 1,
    trace: str | Path | None = None,
    seed: int = 0,
) -> Profile:
    """Profile one UNet step (see the module docstring). `unet_config` a `UNetConfig` (default
    SD1.4's), `latent` the latent side (default the config's sample_size), `images` the images of
    the batch (denoise: 2 rows each with guidance; stage3: an (O, E, T) triple, 6 rows each),
    `attention` "sdpa" (the seam's SDPA at every site; denoise only) or the kernels' backend "auto",
    "torch", "triton"; `maps` which sites of a denoising step return their map."""
    from minid.models.config import UNetConfig
    from minid.models.unet import UNet

    if step not in STEPS:
        raise ValueError(f"step {step!r} is not one of {', '.join(STEPS)}")
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION)}")
    if maps not in MAPS:
        raise ValueError(f"maps {maps!r} is not one of {', '.join(MAPS)}")
    if step == "stage3" and attention == "sdpa":
        raise ValueError(
            "a Stage 3 step runs the kernels' ops; choose the attention backend auto, torch or "
            "triton (sdpa profiles a plain denoising step)"
        )
    if repeat < 1 or warmup < 0 or images < 1:
        raise ValueError(f"repeat ≥ 1, warmup ≥ 0 and images ≥ 1; got {repeat}, {warmup}, {images}")
    config = UNetConfig() if unet_config is None else unet_config
    device = torch.device(device)
    side = config.sample_size if latent is None else latent
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet(config)
    unet = unet.to(dtype).eval()
    rows = images * (2 if guided else 1) * (3 if step == "stage3" else 1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(rows, config.in_channels, side, side, generator=g).to(device, dtype)
    context = torch.randn(rows, 77, config.cross_attention_dim, generator=g).to(device, dtype)
    if step == "stage3":
        inner = stage3_controller(images, side, guided, attention, gating_mode, device)
    else:
        inner = None if attention == "sdpa" else MapAttention(attention, maps)
    on_gpu = device.type == "cuda"
    sites = SiteRanges(inner, cuda=on_gpu)

    def one_step():
        return unet(z, 500, context, controller=sites)

    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    measured = 0.0
    with torch.no_grad():
        for _ in range(warmup):
            one_step()
        _sync(device)
        # a garbage collection is not the step's cost, and one landing between the clock and the
        # range would split them: collect now, and none while the steps are timed
        gc.collect()
        gc.disable()
        try:
            with profile(activities=activities, record_shapes=True) as prof:
                # one step outside the step's range, which every reading skips: the profiler's
                # first events (its lazy set-up) are not charged to the timed steps' clock
                one_step()
                _sync(device)
                sites.events.clear()
                for _ in range(repeat):
                    if on_gpu:
                        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                        start.record()
                    else:
                        t0 = time.perf_counter()
                    with record_function(STEP_RANGE):
                        one_step()
                    if on_gpu:
                        end.record()
                        torch.cuda.synchronize(device)
                        measured += start.elapsed_time(end) / 1e3
                    else:
                        measured += time.perf_counter() - t0
        finally:
            gc.enable()
        cuda_sites = sites.cuda_seconds() if on_gpu else None
        # plain SDPA on inputs of the shapes of every family op the step ran, in a profile of its
        # own read the same way
        with profile(activities=activities) as baseline_prof:
            for name in _family_calls(prof):
                q, k, v = _baseline_inputs(OpCall.parse(name), dtype, device)
                torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm
                for _ in range(repeat):
                    with record_function(BASELINE_PREFIX + name):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v)
            _sync(device)
    if trace is not None:
        trace = Path(trace)
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return _assemble(
        prof,
        baseline_prof,
        sites,
        cuda_sites,
        dtype,
        device,
        side,
        rows,
        repeat,
        measured,
        step,
        attention,
        trace,
    )


def _family_calls(prof) -> list[str]:
    """The distinct range names of the family ops a profile recorded."""
    ops = {op for op, _ in FAMILIES}
    names = {e.name for e in _cpu_events(prof) if (c := OpCall.parse(e.name)) and c.op in ops}
    return sorted(names)


def _assemble(
    prof,
    baseline_prof,
    sites,
    cuda_sites,
    dtype,
    device,
    side,
    rows,
    repeat,
    measured,
    step,
    attention,
    trace,
) -> Profile:
    on_gpu = cuda_sites is not None
    itemsize = torch.empty((), dtype=dtype).element_size()
    site_time, site_ops, rest_parts, step_total, family, _ = _read(prof, on_gpu, itemsize)
    baseline = _read(baseline_prof, on_gpu, itemsize)[-1]
    if on_gpu:
        site_time = cuda_sites
    table = []
    for name, (site, q_shape, k_shape) in sites.seen.items():
        b, h, nq, d = q_shape
        table.append(SiteRow(name, site, b, h, nq, k_shape[2], d, site_ops.get(name, []), 0.0))
        table[-1].time_s = site_time.get(name, 0.0) / repeat
    measured_s = measured / repeat
    # the step on the clock of the sites: the profiler's range on a CPU, CUDA events on a GPU
    step_s = measured_s if on_gpu else step_total / repeat
    rest_s = step_s - sum(r.time_s for r in table)
    parts = {kind: t / repeat for kind, t in sorted(rest_parts.items())}
    left = "idle and launch gaps" if on_gpu else "between ops (Python, dispatch)"
    parts[left] = rest_s - sum(parts.values())
    families = []
    for op, label in FAMILIES:
        row = FamilyRow(op, label)
        for call, seconds in family.get(op, []):
            row.calls += 1
            row.time_s += seconds
            row.flops += call.flops
            row.bytes += call.bytes
            times = baseline.get(call.range_name, [])
            row.sdpa_s += sum(times) / len(times) if times else math.nan
        for attr in ("calls", "time_s", "flops", "bytes", "sdpa_s"):
            setattr(row, attr, getattr(row, attr) / repeat)
        row.calls = round(row.calls)
        families.append(row)
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    return Profile(
        step=step,
        attention=attention,
        device=str(device),
        device_name=name,
        dtype=dtype,
        latent=side,
        rows_in_batch=rows,
        repeat=repeat,
        sites=table,
        rest_s=rest_s,
        rest_parts=parts,
        measured_s=measured_s,
        families=families,
        card=find_card(name) if on_gpu else None,
        trace=trace,
    )


# ---- the tables ----------------------------------------------------------------------------------


def run(args) -> int:
    """`minid profile`: parse the options, profile, print the tables."""
    import sys

    from minid.loading.checkpoint import check_device_dtype
    from minid.models.config import UNetConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dev, dtype = check_device_dtype(device, dtype, what=("--device", "--dtype"))
    config = UNetConfig.tiny() if args.unet == "tiny" else UNetConfig()
    p = profile_unet(
        config,
        latent=args.latent,
        images=args.batch,
        guided=not args.no_guidance,
        dtype=dtype,
        device=dev,
        attention=args.attention,
        maps=args.maps,
        step=args.step,
        gating_mode=args.gating_mode,
        repeat=args.repeat,
        warmup=args.warmup,
        trace=args.trace,
        seed=args.seed,
    )
    print(describe(p))
    print(format_profile(p))
    if p.device != "cpu" and p.card is None:
        print(f"note: no peak rates known for {p.device_name}; see minid.app.profile_report.PEAKS")
    print(f"minid profile: Chrome trace written to {p.trace}", file=sys.stderr)
    return 0
