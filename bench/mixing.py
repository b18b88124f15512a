"""Stage 1's mixing weight on the exact-score testbed: the paper's A.8 Fig. 14 and the update rule
(O2).

Stage 1 (docs/editedid.md, Stage 1; paper Eq. 1-3) mixes the two inversions with a weight w that one
gradient step per inversion step drives from w_0 toward 0.5, and forces w = 0.5 at the last step.
Eq. 1's rule as written (`mixing.adaptive_mixing_inversion` with `rule="raw"`) steps on

    L(w) = (1 − 2w)² D_j,   D_j = mean((ẑ^O_j − ẑ^E_j)²),   w ← clamp(w + 4η(1 − 2w) D_j, 0, 0.5)
    (Eq. 1)

so the gap g = 0.5 − w shrinks by (1 − 8ηD_j) a step: the step is proportional to D_j, the size of
the pair's difference. Candidates here make it independent of D's scale (docs/editedid.md, Open item
O2):

    rule "raw"        Eq. 1 as written: L = (1 − 2w)² D_j
    rule "normalised" L/D_j = (1 − 2w)²:  g ← (1 − 8η) g, whatever the pair
    rule "first"      L/D_1:              g ← (1 − 8η D_j/D_1) g, the growth of D along the
                                          inversion kept
    rule "reach"      "normalised" with η from N: g shrinks geometrically to ρ·g_0 at the last free
                      step, 8η = 1 − ρ^{1/(N−2)} (N = 6: η = 0.0414 for ρ = 0.2; N = 20: 0.0107);
                      ρ = 0.5 is minid's `MixingConfig()`

`mixing_inversion` runs each of them with `samplers.invert_loop` and a callback, mirroring
`mixing.adaptive_mixing_inversion` (rule "raw" with η 0.05 reproduces `MixingConfig(rule="raw")`,
rule "reach" with ρ = 0.5 the shipped `MixingConfig()`, pivots and w to float64 rounding: checked at
start-up), and records D_j and w_j per step.

Fig. 14 (paper A.8): reconstruction PSNR of both images after Stage 1 and Stage 2 (null-text
optimisation, `null_text.null_text_optimization`, guidance 7.5, Mokady's settings), against w_0 ∈
{0.02, 0.04, 0.06, 0.08,
0.1, 0.3, 0.5} at 10 and 20 steps (and 6, the default), on the testbed of bench/defaults.py
(`ToyConfig(offset_rank=16)`: ∅ acts through prompt-like conditioning), for pairs that differ only
in a "face" region (minid/sampling/toy.py `edit_region`: a 3×3 patch of the 8×8 latent, all 4
channels, 14 % of the values, redrawn from the Gaussian conditional of the same component, same
prompt) and for pairs that differ everywhere (two independent latents of two components, two
prompts). The plan is the shipped one, `EditedIDConfig().plan` at each N.

    python bench/mixing.py [--pairs 6]

Writes bench/results/mixing_cpu.md (date, versions, CPU).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from defaults import TESTBED, pairs  # noqa: E402
from record import write_results  # noqa: E402
from unet_forward import cpu_model  # noqa: E402

from minid.imaging.metrics import psnr  # noqa: E402
from minid.method.editedid import EditedIDConfig  # noqa: E402
from minid.method.mixing import MixingConfig, adaptive_mixing_inversion  # noqa: E402
from minid.method.null_text import NullTextConfig, null_text_optimization
from minid.sampling.hybrid import HybridSchedule  # noqa: E402
from minid.sampling.plans import Plan
from minid.sampling.samplers import invert_loop  # noqa: E402
from minid.sampling.toy import GaussianMixtureModel  # noqa: E402

W0S = (0.02, 0.04, 0.06, 0.08, 0.1, 0.3, 0.5)  # Fig. 14's grid


@dataclass(frozen=True)
class MixingRule:
    """One candidate update of w (see the module docstring)."""

    rule: str = "raw"  # "raw", "normalised", "first" or "reach"
    lr: float = 0.05  # η ("raw", "normalised", "first"); ignored by "reach"
    # ρ of "reach": the gap left at the last free step, as a fraction of 0.5 − w_0
    reach: float = 0.2
    w0: float = 0.04
    w_max: float = 0.5

    def name(self) -> str:
        if self.rule != "reach":
            return f"{self.rule} η={self.lr:g}"
        shipped = " (`MixingConfig()`)" if self.reach == MixingConfig().reach else ""
        return f"reach ρ={self.reach:g}{shipped}"

    def step_size(self, num_steps: int) -> float:
        if self.rule != "reach":
            return self.lr
        return (1.0 - self.reach ** (1.0 / max(num_steps - 2, 1))) / 8.0  # 8η = 1 − ρ^{1/(N−2)}


@dataclass
class Mixing:
    """Stage 1's outputs for K pairs, with what the rule saw."""

    pivots_o: list[torch.Tensor]
    pivots_e: list[torch.Tensor]
    # per pair, the w each step mixed with (w_0 … 0.5)
    w: list[list[float]] = field(default_factory=list)
    # per pair, D_j = mean((ẑ^O_j − ẑ^E_j)²) at each step
    d: list[list[float]] = field(default_factory=list)


def mixing_inversion(model, plan: Plan, z0_o, z0_e, cond_o, cond_e, rule: MixingRule) -> Mixing:
    """Stage 1 (Eq. 1-3) with `rule`: each image takes its inversion step, the pair mixes with its
    current w, then w takes one gradient step on the rule's loss; the last step mixes with 0.5 (Eq.
    3). The loss of each rule is (1 − 2w)² D_j / scale with scale 1 ("raw"), D_j ("normalised",
    "reach") or D_1 ("first"); the gradient step is taken in closed form, ∂L/∂w = −4(1 − 2w) D_j /
    scale, as SGD would take it."""
    k_pairs = z0_o.shape[0]
    cond = torch.cat([cond_o, cond_e])
    lr = rule.step_size(len(plan.steps))
    w = [rule.w0] * k_pairs
    first_d: list[float | None] = [None] * k_pairs
    out = Mixing([z0_o], [z0_e], [[] for _ in range(k_pairs)], [[] for _ in range(k_pairs)])

    def eps(z, t, i, land):
        return model(z, t, cond)

    def mix(i, t, z_hat, x0):
        last = i == 0  # the inversion walks the plan backwards: step 0 is its last, to z_T
        zo, ze = z_hat[:k_pairs], z_hat[k_pairs:]
        mixed_o, mixed_e = [], []
        for k in range(k_pairs):
            d = float(((zo[k] - ze[k]).double() ** 2).mean())
            w_j = 0.5 if last else w[k]
            if w_j == 0.5:
                mo = 0.5 * zo[k : k + 1] + 0.5 * ze[k : k + 1]
                me = mo.clone()
            else:
                mo = (1 - w_j) * zo[k : k + 1] + w_j * ze[k : k + 1]
                me = (1 - w_j) * ze[k : k + 1] + w_j * zo[k : k + 1]
            mixed_o.append(mo)
            mixed_e.append(me)
            out.w[k].append(w_j)
            out.d[k].append(d)
            if first_d[k] is None:
                first_d[k] = d
            if not last:
                scale = {"raw": 1.0, "normalised": d, "reach": d, "first": first_d[k]}[rule.rule]
                grad = -4.0 * (1.0 - 2.0 * w[k]) * d / scale if scale > 0 else 0.0
                w[k] = min(max(w[k] - lr * grad, 0.0), rule.w_max)
        mo, me = torch.cat(mixed_o), torch.cat(mixed_e)
        out.pivots_o.append(mo)
        out.pivots_e.append(me)
        return torch.cat([mo, me])

    invert_loop(eps, torch.cat([z0_o, z0_e]), plan, callback=mix)
    return out


def check_rule_is_the_library(model, plan, z0_o, z0_e, cond_o, cond_e, rule, config) -> float:
    """Max abs difference of the pivots and w schedules of `rule` here and
    `adaptive_mixing_inversion` with `config`."""
    ours = mixing_inversion(model, plan, z0_o, z0_e, cond_o, cond_e, rule)
    lib = adaptive_mixing_inversion(model, plan, z0_o, z0_e, cond_o, cond_e, config)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(ours.pivots_o + ours.pivots_e, lib.pivots_o + lib.pivots_e)
    )
    w_diff = max(abs(a - b) for wa, wb in zip(ours.w, lib.w_schedules) for a, b in zip(wa, wb))
    return max(diff, w_diff)


def restore(model, plan, x_o, x_e, cond_o, cond_e, rule: MixingRule | None):
    """Stage 1 (rule, or separate inversions when None) then Stage 2; per-image PSNRs and the Stage
    1 record."""
    if rule is None:
        inv = []
        for x, c in ((x_o, cond_o), (x_e, cond_e)):
            piv = [x]
            invert_loop(
                lambda z, t, i, land, c=c: model(z, t, c),
                x,
                plan,
                callback=lambda i, t, z, x0: piv.append(z),
            )
            inv.append(piv)
        stage1 = Mixing(inv[0], inv[1])
    else:
        stage1 = mixing_inversion(model, plan, x_o, x_e, cond_o, cond_e, rule)
    pivots = [torch.cat([a, b]) for a, b in zip(stage1.pivots_o, stage1.pivots_e)]
    if rule is None:  # no shared z_T: each image starts from its own inversion
        z_t = pivots[-1]
    else:
        z_t = None
    res = null_text_optimization(
        model,
        plan,
        pivots,
        torch.cat([cond_o, cond_e]),
        model.null_prompt(),
        7.5,
        NullTextConfig(),
        z_T=z_t,
    )
    k = x_o.shape[0]
    psnr_o = [psnr(res.z0[i], x_o[i], model.data_range) for i in range(k)]
    psnr_e = [psnr(res.z0[k + i], x_e[i], model.data_range) for i in range(k)]
    return psnr_o, psnr_e, stage1


def mean(values):
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", type=int, default=6, help="pairs of each kind (one per component)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[6, 10, 20],
        help="N of the Fig. 14 grid (the paper's 10 and 20, and the default 6)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mixing_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_time = time.perf_counter()
    model = GaussianMixtureModel(TESTBED)
    # bench/defaults.py's pairs: "face" (a 3×3 patch redrawn, same prompt) and "different" (two
    # components' independent latents), here called "everywhere"
    data = {
        kind: pairs(model, drawn, args.pairs, seed=1 + i)
        for i, (kind, drawn) in enumerate((("face", "face"), ("everywhere", "different")))
    }

    def plan_for(n):
        return EditedIDConfig(solver=HybridSchedule(num_steps=n)).plan(model.schedule)

    # SGD on autograd's ∂L/∂w vs the closed forms: the same up to float64 rounding
    checks = {
        "raw": check_rule_is_the_library(
            model,
            plan_for(6),
            *data["everywhere"],
            MixingRule("raw", 0.05, w0=0.04),
            MixingConfig(w0=0.04, lr=0.05, rule="raw"),
        ),
        "reach ρ=0.5": check_rule_is_the_library(
            model,
            plan_for(6),
            *data["everywhere"],
            MixingRule("reach", reach=0.5),
            MixingConfig(),
        ),
    }
    for name, check in checks.items():
        print(f"rule {name!r} vs mixing.adaptive_mixing_inversion: max abs difference {check:.1e}")
        assert check < 1e-12, f"rule {name!r} must reproduce the library, differs by {check:.1e}"

    rules = [
        MixingRule("raw", 0.05),
        MixingRule("raw", 0.01),
        MixingRule("normalised", 0.02),
        MixingRule("normalised", 0.04),
        MixingRule("normalised", 0.0625),
        MixingRule("first", 0.04),
        MixingRule("reach", reach=0.5),
        MixingRule("reach", reach=0.2),
        MixingRule("reach", reach=0.05),
    ]
    sections = []

    # 1. the w schedules and D per step, w_0 = 0.04, N = 6, 10, 20
    lines = ["## 1. D_j and w_j per inversion step (w_0 = 0.04; first pair of each kind)", ""]
    for n in (6, 10, 20):
        plan = plan_for(n)
        for kind in ("face", "everywhere"):
            for rule in rules:
                m = mixing_inversion(model, plan, *data[kind], rule)
                lines.append(
                    f"- N={n}, {kind}, {rule.name()}: D = "
                    + ", ".join(f"{d:.3g}" for d in m.d[0])
                    + "; w = "
                    + ", ".join(f"{w:.3f}" for w in m.w[0])
                    + f"; jump at the last step {0.5 - m.w[0][-2]:.3f}"
                )
        lines.append("")
    print("\n".join(lines), flush=True)
    sections.append("\n".join(lines))

    # 2. Fig. 14: PSNR of both images after Stages 1-2 against w_0
    for n in args.steps:
        plan = plan_for(n)
        for kind in ("face", "everywhere"):
            header = "| rule | " + " | ".join(f"w_0={w0:g}" for w0 in W0S) + " |"
            differ = "only in the face" if kind == "face" else "everywhere"
            lines = [
                f"## 2. Fig. 14, N = {n}, pairs that differ {differ}: PSNR O / E (dB), mean over "
                f"pairs",
                "",
                header,
                "|---" * (len(W0S) + 1) + "|",
            ]
            print("\n".join(lines), flush=True)
            base_o, base_e, _ = restore(model, plan, *data[kind], None)
            for rule in rules:
                cells = []
                for w0 in W0S:
                    r = MixingRule(rule.rule, rule.lr, rule.reach, w0=w0)
                    po, pe, _ = restore(model, plan, *data[kind], r)
                    cells.append(f"{mean(po):.1f} / {mean(pe):.1f}")
                lines.append(f"| {rule.name()} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
            lines.append(
                f"| no alignment (separate inversions, own z_T) | {mean(base_o):.1f} / "
                f"{mean(base_e):.1f}" + " |" * (len(W0S) - 1) + " |"
            )
            lines.append("")
            print("\n".join(lines[-2:]), flush=True)
            sections.append("\n".join(lines))

    import diffusers

    header = [
        "# Stage 1 mixing weight on the exact-score testbed (paper A.8, Fig. 14; docs/editedid.md "
        "O2)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; run time "
        f"{time.perf_counter() - start_time:.0f} s",
        f"- CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}",
        f"- model: minid.sampling.toy.GaussianMixtureModel({TESTBED}) (K = "
        f"{model.num_components}, d = {model.dim}), {args.pairs} "
        "pairs of each kind, float64; the shipped plan, `EditedIDConfig(solver=HybridSchedule("
        "num_steps=N)).plan`; Stage 2: "
        "`null_text_optimization`, guidance 7.5, `NullTextConfig()`; PSNR over the toy's data "
        "range "
        f"{model.data_range:.3f}",
        "- `mixing.adaptive_mixing_inversion` reproduced: "
        + "; ".join(
            f"rule {name!r}, max abs difference {check:.1e}" for name, check in checks.items()
        ),
        "",
    ]
    table = "\n".join(header) + "\n".join(sections) + "\n"
    write_results(
        args.out,
        table,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "testbed": TESTBED,
            "solver": HybridSchedule(),
            "null_text": NullTextConfig(),
            "guidance": 7.5,
            "w0_grid": list(W0S),
            "torch_threads": torch.get_num_threads(),
        },
        defaults={
            "solver": "minid.sampling.hybrid.HybridSchedule",
            "null_text": "minid.method.null_text.NullTextConfig",
        },
    )


if __name__ == "__main__":
    main()
