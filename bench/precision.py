"""Stage 2's precision on the full-size SD1.4 UNet: the null-text gradient and the loss reached, per
dtype.

Stage 2 (docs/editedid.md, Stage 2; paper Eq. 4; Mokady et al. 2023) optimises the unconditional
embedding ∅ of one step so that the guided step lands on the pivot:

    L(∅) = mean((Step(z, ε̃(∅)) − pivot)²),   ε̃ = ε(z, t, ∅) + 7.5 (ε(z, t, c) − ε(z, t, ∅))

and stops once L < 1e-5 + i·2e-5. Near the stop, the residual Step − pivot is ~3e-3 per value, a few
fp16 ulps of a latent of size 1: rounding in the step or in ε can then turn the gradient. Measured
here on the full-size SD1.4 UNet (minid.models.unet.UNet(UNetConfig())) with random weights (seeded:
N(0, 1/fan_in) for matrices and convs, N(0, 0.01) for vectors, as bench/unet_forward.py), batch 1, a
small latent, on the CPU:

1. the loss each policy computes at the exact optimum (true loss 0): the floor its rounding puts
   under Stage 2, to compare with the thresholds;
2. the gradient ∂L/∂∅ in each policy against a float64 reference (cosine, relative norm), at losses
   1e-3, 1e-4 and 1e-5 (= the first step's threshold); the fp16 UNets, ~1 min per gradient on a CPU,
   at the last two;
3. one Stage 2 step (`null_text.null_text_optimization`: ≤ 10 Adam updates, threshold 1e-5) from a
   loss of 1e-4, ten times the threshold: the loss the policy reports, and the true loss of the ∅ it
   keeps, evaluated in float64 (the fp16 UNets only with --stage2-fp16);
4. memory: the weights, and the activations autograd saves for one ∂L/∂∅ (saved-tensor hooks),
   fitted and taken to the 64×64 latent of a 512² image.

The pivot is reachable: it is the float64 step with ∅* = ∅_0 + δ, δ random, scaled so that L(∅_0)
hits the level; so the optimum is L = 0 and the policies differ only by rounding. The step is the
default plan's fourth, DDIM from t = 333 to 10.63 (docs/editedid.md, Samplers, the default plan's
table).

Policies:
- fp32: UNet, latents and embeddings in float32 (the library on the CPU today);
- fp16 / bf16: everything in that dtype (the UNet's weights, the latents, the step and the loss);
- fp16-UNet / bf16-UNet: the UNet in that dtype, the latents, the step, the loss and ∅ in float32 (ε
  cast up as it leaves the UNet, the inputs cast down as they enter);
- fp16-UNet, loss scale 2^16: the same, with the gradient multiplied by 2^16 while it crosses the
  UNet (`GradScale`), as mixed-precision training does against fp16 underflow.

    python bench/precision.py [--latent 16]

Writes bench/results/precision_cpu.md (date, versions, CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402
from unet_forward import cpu_model  # noqa: E402

from minid.method.null_text import NullTextConfig, null_text_optimization  # noqa: E402
from minid.models.config import UNetConfig  # noqa: E402
from minid.models.unet import UNet  # noqa: E402
from minid.sampling.hybrid import hybrid_plan
from minid.sampling.plans import DDIM, Plan, PlanStep  # noqa: E402
from minid.sampling.samplers import SolverState, cfg, hybrid_step  # noqa: E402
from minid.sampling.schedule import NoiseSchedule  # noqa: E402

GUIDANCE = 7.5
LEVELS = (1e-3, 1e-4, 1e-5)  # initial losses: 100×, 10× and 1× the first step's threshold
# name: (UNet dtype, dtype of latents, step, loss and ∅, loss scale of the UNet's backward)
POLICIES = {
    "fp32": (torch.float32, torch.float32, 1.0),
    "bf16": (torch.bfloat16, torch.bfloat16, 1.0),
    "fp16": (torch.float16, torch.float16, 1.0),
    "bf16-UNet": (torch.bfloat16, torch.float32, 1.0),
    "fp16-UNet": (torch.float16, torch.float32, 1.0),
    "fp16-UNet, loss scale 2^16": (torch.float16, torch.float32, 2.0**16),
}


@torch.no_grad()
def build_unet(seed: int = 0) -> UNet:
    """SD1.4's UNet with N(0, 1/fan_in) weights (vectors N(0, 0.01)), float32."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    unet = unet.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    for p in unet.parameters():
        p.normal_(generator=g).div_(p[0].numel() ** 0.5 if p.ndim > 1 else 10.0)
    for p in unet.parameters():
        p.requires_grad_(False)  # Stage 2 differentiates with respect to ∅ only
    return unet


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (loss scaling around a
    half-precision network: ×S where the gradient enters it, ×1/S where it leaves, so small
    gradients do not underflow)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Cast:
    """The UNet in one dtype, called with and returning another: inputs cast down, ε cast up; with
    `loss_scale` S ≠ 1 the gradient crosses the UNet multiplied by S."""

    def __init__(
        self, unet: UNet, unet_dtype: torch.dtype, io_dtype: torch.dtype, loss_scale: float = 1.0
    ):
        self.unet, self.unet_dtype, self.io_dtype, self.loss_scale = (
            unet,
            unet_dtype,
            io_dtype,
            loss_scale,
        )

    def __call__(self, z, t, context, controller=None):
        if self.loss_scale != 1.0 and context.requires_grad:
            context = GradScale.apply(context, 1.0 / self.loss_scale)
        eps = self.unet(
            z.to(self.unet_dtype), t, context.to(self.unet_dtype), controller=controller
        )
        eps = eps.to(self.io_dtype)
        if self.loss_scale != 1.0 and eps.requires_grad:
            eps = GradScale.apply(eps, self.loss_scale)
        return eps


def one_step_plan(schedule: NoiseSchedule) -> Plan:
    """The default hybrid plan's fourth step alone (DDIM 333 → 10.63)."""
    step = hybrid_plan(schedule).steps[3]
    assert step.solver == DDIM, step
    return Plan(schedule, (PlanStep(DDIM, step.t, step.s, step.timestep),))


def loss_and_grad(model, plan, z, cond, null, target, need_grad=True):
    """L(∅) and ∂L/∂∅ for one step (as null_text_optimization computes them: ε(c) without
    gradient)."""
    step = plan.steps[0]
    with torch.no_grad():
        e_c = model(z, step.timestep, cond)
    null = null.clone().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        e_u = model(z, step.timestep, null)
        landed = hybrid_step(z, cfg(e_u, e_c, GUIDANCE), step, plan.schedule, SolverState())[0]
        loss = ((landed.double() - target.double()) ** 2).mean()
        grad = torch.autograd.grad(loss, null)[0] if need_grad else None
    return float(loss.detach()), grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves while `fn` runs (what a backward keeps alive), the
    weights (`params`, saved by reference for the backward of every layer) left out."""
    total = 0
    seen = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = 128² pixels)")
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="Adam lr of the Stage 2 step (Mokady's 0.01 overshoots on this random UNet)",
    )
    parser.add_argument(
        "--stage2-fp16",
        action="store_true",
        help="also run the Stage 2 step in the fp16 policies (~10 min each on a 2-core CPU)",
    )
    parser.add_argument(
        "--memory-sides", type=int, nargs="+", default=[16, 32, 48], help="latent sides for part 4"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision_cpu.md")
    args = parser.parse_args()
    start_time = time.perf_counter()
    schedule = NoiseSchedule.scaled_linear()
    plan = one_step_plan(schedule)
    s = args.latent
    g = torch.Generator().manual_seed(1)
    z64 = torch.randn(1, 4, s, s, generator=g, dtype=torch.float64)
    cond64 = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    null64 = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    direction = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)

    unet32 = build_unet()
    ref = copy.deepcopy(unet32).double()

    # the pivots: the float64 step with ∅* = ∅_0 + c·δ, c set so that L(∅_0) = level (secant
    # corrections)
    def landed(model, z, cond, null):
        step = plan.steps[0]
        with torch.no_grad():
            e = cfg(model(z, step.timestep, null), model(z, step.timestep, cond), GUIDANCE)
            return hybrid_step(z, e, step, schedule, SolverState())[0]

    base = landed(ref, z64, cond64, null64)
    targets, optima, reference = {}, {}, {}
    for level in LEVELS:
        c = 1e-2
        for _ in range(3):
            loss = float(((base - landed(ref, z64, cond64, null64 + c * direction)) ** 2).mean())
            c *= math.sqrt(level / loss)
        optima[level] = null64 + c * direction
        targets[level] = landed(ref, z64, cond64, optima[level])
        t0 = time.perf_counter()
        reference[level] = loss_and_grad(ref, plan, z64, cond64, null64, targets[level])
        print(
            f"float64 reference, level {level:g}: loss {reference[level][0]:.3e}, |δ| per value "
            f"{c:.3f} "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

    def true_loss(null, level):  # the loss of an embedding, in float64
        return float(((landed(ref, z64, cond64, null.double()) - targets[level]) ** 2).mean())

    config = NullTextConfig(lr=args.lr)
    grad_rows, floor_rows, stage_rows, failures, times = [], [], [], [], {}
    t0 = time.perf_counter()
    res = null_text_optimization(ref, plan, [targets[1e-4], z64], cond64, null64, GUIDANCE, config)
    st = res.steps[0]
    stage_rows.append(
        (
            "fp64",
            st.initial_loss[0],
            st.final_loss[0],
            st.iterations[0],
            true_loss(res.null_embeddings[0], 1e-4),
            time.perf_counter() - t0,
        )
    )
    for name, (unet_dtype, io_dtype, loss_scale) in POLICIES.items():
        model_unet = unet32 if unet_dtype == torch.float32 else copy.deepcopy(unet32).to(unet_dtype)
        model = Cast(model_unet, unet_dtype, io_dtype, loss_scale)
        z, cond, null = z64.to(io_dtype), cond64.to(io_dtype), null64.to(io_dtype)
        half_unet = unet_dtype == torch.float16
        try:
            # the loss the policy computes at the exact optimum ∅*, where the true loss is 0: its
            # rounding floor
            floor = float(
                (
                    (landed(model, z, cond, optima[1e-5].to(io_dtype)).double() - targets[1e-5])
                    ** 2
                ).mean()
            )
            floor_rows.append((name, floor))
            print(f"{name:10s} loss at the optimum (true 0): {floor:.2e}", flush=True)
            for level in LEVELS[1:] if half_unet else LEVELS:  # fp16 on a CPU: ~1 min per gradient
                t0 = time.perf_counter()
                loss, grad = loss_and_grad(model, plan, z, cond, null, targets[level].to(io_dtype))
                times[name] = time.perf_counter() - t0
                ref_loss, ref_grad = reference[level]
                grad_rows.append(
                    (
                        name,
                        level,
                        loss / ref_loss,
                        cosine(grad, ref_grad),
                        float(grad.double().norm() / ref_grad.norm()),
                    )
                )
                print(
                    f"{name:10s} level {level:g}: loss/ref {loss / ref_loss:.4f}, grad cosine "
                    f"{grad_rows[-1][3]:.6f}, |g|/|g_ref| {grad_rows[-1][4]:.4f} "
                    f"({times[name]:.1f} s)",
                    flush=True,
                )
            if half_unet and not args.stage2_fp16:
                stage_rows.append((name, None, None, None, None, 11 * times[name]))
                continue
            t0 = time.perf_counter()
            res = null_text_optimization(
                model, plan, [targets[1e-4].to(io_dtype), z], cond, null, GUIDANCE, config
            )
            st = res.steps[0]
            stage_rows.append(
                (
                    name,
                    st.initial_loss[0],
                    st.final_loss[0],
                    st.iterations[0],
                    true_loss(res.null_embeddings[0], 1e-4),
                    time.perf_counter() - t0,
                )
            )
            print(
                f"{name:10s} Stage 2 step: reported {st.initial_loss[0]:.3e} → "
                f"{st.final_loss[0]:.3e} in "
                f"{st.iterations[0]} updates; true loss of the kept ∅ {stage_rows[-1][4]:.3e}",
                flush=True,
            )
        except Exception as err:  # what does not run on this CPU is a result too
            failures.append((name, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            print(f"{name}: FAILED {failures[-1][1]}", flush=True)
            traceback.print_exc(limit=2)
        finally:
            del model_unet, model
            gc.collect()
    del ref
    gc.collect()

    # 4. memory: weights, and saved activations for one ∂L/∂∅ (batch 1) at several latent sides
    params = sum(p.numel() for p in unet32.parameters())
    mem_rows = []
    for dtype in (torch.float32, torch.bfloat16):
        m = unet32 if dtype == torch.float32 else copy.deepcopy(unet32).to(dtype)
        for side in args.memory_sides:
            zz = torch.randn(1, 4, side, side, dtype=dtype)
            ctx = torch.randn(1, 77, 768, dtype=dtype, requires_grad=True)
            nbytes = saved_bytes(lambda: m(zz, 333, ctx), list(m.parameters()))
            mem_rows.append((side, dtype, nbytes))
            print(
                f"saved activations, latent {side}², {dtype}: {nbytes / 2**20:.0f} MiB", flush=True
            )
        del m
        gc.collect()
    # bytes = a + b·n + c·n², n = side² (attention maps would make c > 0), fitted and taken to 64²
    # (512 px)
    extrapolated = {}
    for dtype in (torch.float32, torch.bfloat16):
        pts = [(float(sd * sd), float(b)) for sd, dt, b in mem_rows if dt == dtype]
        a = torch.tensor([[1.0, n, n * n] for n, _ in pts], dtype=torch.float64)
        y = torch.tensor([b for _, b in pts], dtype=torch.float64)
        coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
        n64 = 64.0 * 64.0
        extrapolated[dtype] = float(coef[0] + coef[1] * n64 + coef[2] * n64 * n64)

    def fmt_stage(row):
        n, a, b, k, tl, tt = row
        if a is None:
            return f"| {n} | not run | | | | ≈ {tt:.0f} (11 × one ∂L/∂∅) |"
        return f"| {n} | {a:.3e} | {b:.3e} | {k} | {tl:.3e} | {tt:.0f} |"

    gib = 2**30
    lines = [
        "# Stage 2 precision on the full-size SD1.4 UNet (random weights, CPU)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; run time "
        f"{time.perf_counter() - start_time:.0f} s",
        f"- CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- minid.models.unet.UNet(UNetConfig()), {params / 1e6:.0f} M parameters, N(0, 1/fan_in) "
        f"weights (seed 0); latent "
        f"{s}×{s}, batch 1; context and ∅ N(0, 1) (1, 77, 768); guidance {GUIDANCE}; the step: "
        f"DDIM "
        f"{plan.steps[0].t:g} → {plan.steps[0].s:.2f} (the default plan's 4th)",
        "- policies as in the bench/precision.py docstring; the reference is the same computation "
        "in float64",
        "",
        "## 1. The loss each policy computes at the exact optimum ∅* (true loss 0): its rounding "
        "floor",
        "",
        "The first step's early-stop threshold is 1e-5; a policy whose floor is above it cannot "
        "stop early and "
        "optimises rounding noise near the end.",
        "",
        "| policy | loss at ∅* |",
        "|---|---|",
        *[f"| {n} | {f:.2e} |" for n, f in floor_rows],
        "",
        "## 2. ∂L/∂∅ against float64",
        "",
        "| policy | true (float64) loss | loss the policy computes / true | cosine to the float64 "
        "gradient | "
        "‖g‖ / ‖g_64‖ |",
        "|---|---|---|---|---|",
        *[f"| {n} | {lv:g} | {r:.4f} | {c:.6f} | {q:.4f} |" for n, lv, r, c, q in grad_rows],
        "",
        f"## 3. One Stage 2 step from L = 1e-4 (threshold 1e-5, ≤ 10 Adam updates, lr {args.lr:g})",
        "",
        f"Mokady's lr 0.01 overshoots on this random UNet (float32: 1e-4 → 2.7e-4 in 10 updates), "
        f"so the step runs "
        f"at lr {args.lr:g}, where float64 converges; the policies then differ by rounding only.",
        "",
        "| policy | reported initial loss | reported final loss | updates | true loss of the kept "
        "∅ (float64) | "
        "time (s) |",
        "|---|---|---|---|---|---|",
        *[fmt_stage(r) for r in stage_rows],
        "",
        "## 4. Memory",
        "",
        f"- weights: {params * 4 / gib:.2f} GiB in float32, {params * 2 / gib:.2f} GiB in "
        f"fp16/bf16, "
        f"{params * 8 / gib:.2f} GiB in float64",
        "- activations autograd saves for one ∂L/∂∅ (one image, the ∅ half of the guidance batch; "
        "saved-tensor "
        "hooks; Stage 2 batches the 2K images of K pairs, so multiply by 2K):",
        "",
        "| latent | dtype | saved (MiB) |",
        "|---|---|---|",
        *[
            f"| {sd}×{sd} | {str(dt).replace('torch.', '')} | {b / 2**20:.0f} |"
            for sd, dt, b in mem_rows
        ],
        *[
            f"| 64×64 (fitted a + b·n + c·n², n = side²) | {str(dt).replace('torch.', '')} | "
            f"{v / 2**20:.0f} |"
            for dt, v in extrapolated.items()
        ],
        "",
    ]
    if failures:
        lines += ["## What did not run", "", *[f"- {n}: {e}" for n, e in failures], ""]
    table = "\n".join(lines)
    print(table)
    run_config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "unet": UNetConfig(),
        "unet_weights": "N(0, 1/fan_in) matrices and convs, N(0, 0.01) vectors, seed 0",
        "inputs": {
            "seed": 1,
            "latent": [1, 4, s, s],
            "context": [1, 77, 768],
            "dtype": "float64",
            "optimum": "∅_0 + c·δ, c from 3 secant corrections",
        },
        "guidance": GUIDANCE,
        "levels": LEVELS,
        "policies": {
            name: {
                "unet_dtype": str(unet_dtype).removeprefix("torch."),
                "io_dtype": str(io_dtype).removeprefix("torch."),
                "loss_scale": loss_scale,
            }
            for name, (unet_dtype, io_dtype, loss_scale) in POLICIES.items()
        },
        "schedule": "NoiseSchedule.scaled_linear()",
        "step": plan.steps[0],
        "null_text": config,
        "stage2_level": 1e-4,
        "memory_dtypes": ["float32", "bfloat16"],
        "memory_timestep": 333,
        "memory_fit_side": 64,
    }
    # claimed only when the run's Stage 2 config is the shipped one (--lr 0.01)
    defaults = {"unet": "minid.models.config.UNetConfig"}
    if config == NullTextConfig():
        defaults["null_text"] = "minid.method.null_text.NullTextConfig"
    write_results(args.out, table, run_config, defaults)


if __name__ == "__main__":
    main()
