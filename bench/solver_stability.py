"""Solver stability on the exact-score testbed: the paper's A.13 Table 11, and the DPM-Solver++
spacing (O1).

Every plan is run as Table 11 runs it: inversion of clean latents, then reconstruction from the end
of the inversion, with the same plan backwards and forwards (docs/editedid.md, Samplers; paper Eq.
5-6). The model is minid/sampling/toy.py's Gaussian mixture, whose ε is exact, so every error below
is the solvers' own. Guidance is 1 (the conditional prompt only) in both passes and there is no
null-text optimisation: what is measured is what Stage 2 would have to absorb.

Metrics, per latent, then mean ± sd over the latents (Table 11's columns,
`minid.app.validate.trajectory_metrics`, which `minid validate` computes on real latents; the
paper's scale factors were lost in extraction, so only the ordering is comparable):
- cumulative MSE: Σ_j mean((ẑ_j − z_j)²) over the levels j = 0 … N−1 of the plan, ẑ the
  reconstruction and z the inversion at the same level (the shared start j = N is 0), in units of
  1e-3;
- max jump: the largest per-step change RMS(ẑ_j − ẑ_{j+1}) along the reconstruction;
- final L2: ‖ẑ_0 − x_0‖₂ over the latent's 256 values;
- PSNR: of ẑ_0 against x_0, over the toy's data range (6 sd);
- sample RMS: a different question, how well the plan *samples*: from the exact ODE point at the
  plan's first time (the flow of x_0 there, `GaussianMixtureModel.flow`), the plan's reconstruction
  vs the exact flow at the plan's end level (FINAL for DDIM, CLEAN for DPM-Solver++), RMS over all
  values.

Rows: DDIM only (SD's leading spacing); DPM-Solver++ only (diffusers' pass, 2M, each spacing);
hybrid fragmented (Table 11's "Hybrid-fragmented"); hybrid global (Eq. 6) with each DPM-Solver++
spacing. The hybrid rows put DPM-Solver++ on the shipped window (`HybridSchedule()`: the last
third, round(N/3) steps; at N = 6 5 … 6), every other field at its default. One more row,
"logSNR, exact t", tells the toy the solver's fractional time instead of round(t), to separate the
spacing from the rounding of its timesteps.

A last section repeats DDIM and the global hybrids with the toy's detail variances scaled (×0.25,
×4): where in σ the details form decides how much the last steps matter, and so the spacing's
ranking.

    python bench/solver_stability.py [--samples 36] [--steps 6 10 20] [--detail-scales 0.25 4]

Writes bench/results/solver_stability_cpu.md (date, versions, CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from unet_forward import cpu_model  # noqa: E402

from minid.app.validate import round_trip, trajectory_metrics  # noqa: E402
from minid.sampling.hybrid import HybridSchedule, hybrid_plan  # noqa: E402
from minid.sampling.plans import Plan, ddim_plan, dpm_solver_plan
from minid.sampling.samplers import sample_loop  # noqa: E402
from minid.sampling.schedule import CLEAN, DPM_SPACINGS, NoiseSchedule  # noqa: E402
from minid.sampling.toy import GaussianMixtureModel  # noqa: E402
from record import write_results  # noqa: E402


def plans(schedule: NoiseSchedule, n: int) -> list[tuple[str, Plan, bool]]:
    """(row name, plan, tell the model the exact solver time) for N steps."""
    last_two = dict(num_steps=n)  # the shipped window: the last third
    rows = [("DDIM only", ddim_plan(schedule, n), False)]
    rows += [
        (f"DPM-Solver++ only, {sp}", dpm_solver_plan(schedule, n, sp), False) for sp in DPM_SPACINGS
    ]
    # the paper's Fig. 3(3)
    fragmented = HybridSchedule(**last_two, timesteps="fragmented", dpm_spacing="logSNR")
    rows.append(("hybrid, fragmented", hybrid_plan(schedule, fragmented), False))
    rows += [
        (
            f"hybrid, global, {sp}",
            hybrid_plan(schedule, HybridSchedule(**last_two, dpm_spacing=sp)),
            False,
        )
        for sp in DPM_SPACINGS
    ]
    rows.append(
        (
            "hybrid, global, logSNR, exact t",
            hybrid_plan(schedule, HybridSchedule(**last_two, dpm_spacing="logSNR")),
            True,
        )
    )
    return rows


def metrics(model, plan, x0, context, exact_t, exact_start, exact_end) -> dict[str, list[float]]:
    """Table 11's metrics of the round trip of x0 (minid.app.validate: the same as `minid validate`
    on real latents; PSNR over the toy's data range), and the sample RMS against the exact flow."""

    def eps(z, timestep, i, land):  # guidance 1: the conditional prompt only
        return model(z, plan.steps[i].t if exact_t else timestep, context)

    m = trajectory_metrics(*round_trip(eps, plan, x0), data_range=model.data_range)
    sampled = sample_loop(eps, exact_start, plan)
    return {**m, "sample": [float(((sampled - exact_end) ** 2).mean().sqrt())]}


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits + 1}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def measure(
    model: GaussianMixtureModel, n: int, samples: int, flow_steps: int, keep=lambda name: True
) -> list[tuple[str, dict[str, list[float]], str]]:
    """The rows of one table: (name, metrics, the plan's times) for every plan of `plans` that
    `keep` keeps."""
    k = model.num_components
    context = model.prompt([i % k for i in range(samples)])
    x0, _ = model.sample(context, torch.Generator().manual_seed(0))
    rows, flows = [], {}

    def flow(z, key, t, s):  # plans share their first times and end levels: one exact flow each
        if key not in flows:
            flows[key] = model.flow(z, t, s, context, steps=flow_steps)
        return flows[key]

    for name, plan, exact_t in plans(model.schedule, n):
        if not keep(name):
            continue
        t_first, end = plan.steps[0].t, plan.steps[-1].s
        z_start = flow(x0, ("start", t_first), CLEAN, t_first)  # the exact ODE point at t_first
        z_end = flow(z_start, ("end", t_first, end), t_first, end)  # … and at the plan's end level
        m = metrics(model, plan, x0, context, exact_t, z_start, z_end)
        times = ", ".join(f"{s.t:.0f}" if s.t == int(s.t) else f"{s.t:.1f}" for s in plan.steps)
        rows.append((name, m, times))
        print(
            f"N={n:2d} {name:34s} cum {fmt(m['cum_mse'])}  jump {fmt(m['max_jump'])}  L2 "
            f"{fmt(m['final_l2'])}  "
            f"PSNR {fmt(m['latent_psnr'])}  sample RMS {fmt(m['sample'])}   [{times}]",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=36, help="latents per plan (6 per component)"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 10, 20])
    parser.add_argument(
        "--flow-steps", type=int, default=160, help="RK4 steps of the exact reference flow"
    )
    parser.add_argument(
        "--detail-scales",
        type=float,
        nargs="*",
        default=[0.25, 4.0],
        help="the toy's detail variances times these, for the sensitivity section (N = 6, 10)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "solver_stability_cpu.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # the toy's tensors are tiny: one thread is fastest on a shared CPU
    start_time = time.perf_counter()

    model = GaussianMixtureModel()
    sections = []
    columns = (
        "| method | cumulative MSE (1e-3) ↓ | max jump ↓ | final latent L2 ↓ | PSNR (dB) ↑ | "
        "sample RMS vs exact flow ↓ |"
    )
    for n in args.steps:
        rows = measure(model, n, args.samples, args.flow_steps)
        lines = [
            f"### N = {n}",
            "",
            columns + " times t_i (model told round(t)) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {fmt(m['cum_mse'])} | {fmt(m['max_jump'])} | {fmt(m['final_l2'])} | "
            f"{fmt(m['latent_psnr'])} | "
            f"{fmt(m['sample'])} | {times} |"
            for name, m, times in rows
        ]
        sections.append("\n".join(lines))

    # the spacing's ranking against the toy's detail scale: DDIM and the global hybrids
    keep = lambda name: (
        name == "DDIM only" or (name.startswith("hybrid, global") and "exact" not in name)
    )  # noqa
    for scale in args.detail_scales:
        c = model.config
        scaled = GaussianMixtureModel(
            dataclasses.replace(c, detail_min=c.detail_min * scale, detail_max=c.detail_max * scale)
        )
        for n in (6, 10):
            rows = measure(scaled, n, args.samples, args.flow_steps, keep)
            lines = [
                f"### Detail variances × {scale:g} (sd {math.sqrt(c.detail_min * scale):.3f} … "
                f"{math.sqrt(c.detail_max * scale):.3f}), N = {n}",
                "",
                columns,
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {name} | {fmt(m['cum_mse'])} | {fmt(m['max_jump'])} | {fmt(m['final_l2'])} | "
                f"{fmt(m['latent_psnr'])} | "
                f"{fmt(m['sample'])} |"
                for name, m, times in rows
            ]
            sections.append("\n".join(lines))

    import diffusers  # for the versions line only

    header = [
        "# Solver stability on the exact-score testbed (paper A.13, Table 11; docs/editedid.md O1)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; run time "
        f"{time.perf_counter() - start_time:.0f} s",
        f"- CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}",
        f"- model: minid.sampling.toy.GaussianMixtureModel() (K = {model.num_components} "
        f"components, d = {model.dim}, rank "
        f"{model.config.rank} + diagonal detail variances {model.config.detail_min:g} … "
        f"{model.config.detail_max:g}, "
        f"prompt strength {model.config.prompt_strength}), {args.samples} latents (seed 0), "
        f"float64, "
        "guidance 1 both ways, no null-text",
        f"- exact flow: RK4, {args.flow_steps} steps in log(u + 0.01); data range for PSNR "
        f"{model.data_range:.3f} (6 sd)",
        "- hybrid rows: `HybridSchedule(num_steps=N, dpm_spacing=...)`, DPM-Solver++ (2M, "
        '`history="pass"`, `final_order=2`) on the last third of the steps; DPM-only rows: '
        "diffusers' pass (2M, warm-up, order 1 to CLEAN); the shipped default is the logSNR row",
        "",
        "Columns as in the bench/solver_stability.py docstring; mean ± sd over the latents; sample "
        "RMS is one "
        "number over all latents.",
        "",
    ]
    table = "\n".join(header) + "\n\n".join(sections) + "\n"
    print(table)
    write_results(
        args.out,
        table,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "testbed": model.config,
            "hybrid": HybridSchedule(),
            "guidance": 1.0,
            "torch_threads": torch.get_num_threads(),
        },
        defaults={"hybrid": "minid.sampling.hybrid.HybridSchedule"},
    )


if __name__ == "__main__":
    main()
