"""EditedID's hybrid solver as a plan (paper Eq. 5-6; docs/editedid.md, "Samplers"): DPM-Solver++ on
steps τ_s … τ_e and DDIM on the others, with global timestep pre-setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from minid.sampling.plans import DDIM, DPM_SOLVER, Plan, _with_orders
from minid.sampling.schedule import CLEAN, FINAL, NoiseSchedule, ddim_timesteps, dpm_solver_times


@dataclass(frozen=True)
class HybridSchedule:
    """EditedID's hybrid solver (paper Eq. 5-6): DPM-Solver++ on steps τ_s … τ_e, DDIM on the
    others.

    Orders. The DDIM steps before the switch predict x̂_0 at known λ too, and the path is continuous
    under global pre-setting, so with `history="pass"` a DPM-Solver++ step uses the predictions of
    every preceding step of the pass: step τ_s is already of order min(dpm_order, τ_s). That is the
    point of running DPM-Solver++ (2M) on the final steps (paper Eq. 5-6); with a warm-up per run
    (`history="run"`) the two default steps would be orders 1 and 1, and DPM-Solver++ order 1 is
    DDIM.

    `lower_order_final` is diffusers' rule for passes of fewer than 15 steps: the last step at order
    1 and the one before at ≤ 2. diffusers lowers them to stabilise few-step sampling near σ = 0,
    where the steps are long in λ and the extrapolation of x̂_0 from the previous steps is least
    reliable; the last step to σ = 0 has h = ∞, where the λ-Taylor terms diverge, so diffusers takes
    it at order 1 for any number of steps (final_sigmas_type="zero"), and k-diffusion's
    DPM-Solver++(2M) does the same. Here the last step to CLEAN of order ≥ 2 extrapolates x̂_0 to σ
    = 0 in u = σ²/α², which stays finite (samplers.py, block comment before `_dpm_solver_update`),
    so the cap on the last step is a field, `final_order`, default 2: the default hybrid (N = 6,
    steps 5-6, 2M) runs orders [DDIM ×4, 2, 2]. Its inversion runs [DDIM ×4, 1, 1]: it starts at
    CLEAN, whose prediction has λ = ∞ and cannot enter a λ-difference (see `_with_orders`).
    `HybridSchedule(history="run", final_order=1)` reproduces the earlier plans: order-1 warm-up per
    run.

    Round trips (inversion, then sampling, with ε independent of z): exact for a constant ε at any
    orders, since x̂_0 is then constant along the path and every multistep difference vanishes. If ε
    varies with t, only the order-1 plans (DDIM, and `history="run", final_order=1` here) are exact;
    a multistep step's sampling history lies at noisier points and its inversion's at less noisy
    ones, so the two updates are not inverse to each other (default plan: ~1e-2 for ε = (1 + ½
    sin(t/100))·n, tests/test_samplers.py).
    """

    num_steps: int = 6  # N, model calls per pass (the paper's 6)
    # τ_s, τ_e: the first and last steps run by DPM-Solver++, 1-based, counted from pure noise; a
    # negative value counts from the end (−1 is step N). dpm_start=None (the default) is the last
    # third of the pass, round(N/3) steps and at least one: the paper's 5 … 6 at N = 6, 8 … 10 at
    # N = 10, 14 … 20 at N = 20 (decided on the pipeline, bench/results/defaults_cpu.md: a fixed two
    # steps lost 2.3 dB at N = 20). τ_s > τ_e (resolved) gives DDIM only.
    dpm_start: int | None = None
    dpm_end: int = -1
    # "global": both full N-step sequences first, step i takes t_i from its solver's sequence and
    # lands where step i+1 starts (paper Eq. 6, no jump at the switch). "fragmented": each run of
    # one solver uses that solver's own sequence for its own number of steps, landing by its own
    # rule (the paper's ablation, which jumps at the switch).
    timesteps: str = "global"
    ddim_spacing: str = "leading"  # SD's DDIM spacing (with the schedule's steps_offset)
    # λ-uniform "logSNR" (the default, paper A.4's "log-uniform"; schedule.dpm_solver_times:
    # decided on the pipeline, bench/results/defaults_cpu.md, docs/editedid.md O1), or diffusers'
    # DPMSolverMultistepScheduler spacings "leading", "linspace", "trailing"
    dpm_spacing: str = "logSNR"
    dpm_order: int = 2  # DPM-Solver++ order (2M is diffusers' default)
    # "pass": DPM-Solver++ steps use the x̂_0 of every preceding step on the path, DDIM steps'
    # included; "run": only those of the current run of DPM-Solver++ steps (order-1 warm-up after
    # each switch)
    history: str = "pass"
    # diffusers' rule for passes of < 15 steps: cap the last two steps' orders
    lower_order_final: bool = True
    # the cap on the last step under lower_order_final (diffusers: 1); the one before: 2
    final_order: int = 2
    # where a pass whose last step is DPM-Solver++ ends, and so where its inversion starts: "clean"
    # (σ = 0, diffusers' final_sigmas_type="zero"), or "final", DDIM's last level (ᾱ_0, σ = 0.029 on
    # SD1.4). From CLEAN the first inversion step's x̂_0 is the latent itself whatever the model
    # says, so it goes up to α_t·z_0, a latent with no noise in it that the next step's model is
    # asked about at t; from FINAL the model is asked about the clean latent at the step's label t
    # (as DDIM inversion asks it), and that ε carries z_0 up (docs/editedid.md, "Samplers")
    last_level: str = "clean"
    # clamp the DDIM steps' x̂_0 (diffusers' DDIMScheduler option; see `Plan`)
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def window(self) -> tuple[int, int]:
        """(τ_s, τ_e) as step numbers 1 … N: a negative value counts from the end (−1 → N, −2 → N −
        1), no further back than step 1 (as a slice would: the last two of a 1-step pass is its one
        step); dpm_start=None is −round(N/3) (at least −1)."""
        n = self.num_steps
        start = -max(1, round(n / 3)) if self.dpm_start is None else self.dpm_start
        return tuple(max(k + n + 1, 1) if k < 0 else k for k in (start, self.dpm_end))

    def solvers(self) -> list[str]:
        start, end = self.window()
        return [DPM_SOLVER if start <= i <= end else DDIM for i in range(1, self.num_steps + 1)]


def hybrid_plan(schedule: NoiseSchedule, hybrid: HybridSchedule = HybridSchedule()) -> Plan:
    """The per-step solver and times of the hybrid solver; the inversion walks the same steps
    backwards (the paper's symmetry: the same solver at the same noise levels). Global pre-setting:
    `_global_times`."""
    n, T = hybrid.num_steps, schedule.num_train_timesteps
    solvers = hybrid.solvers()
    if hybrid.last_level not in ("clean", "final"):
        raise ValueError(
            f"HybridSchedule.last_level={hybrid.last_level!r} is not 'clean' or 'final'"
        )
    # where each solver's own pass ends
    final = {DDIM: FINAL, DPM_SOLVER: CLEAN if hybrid.last_level == "clean" else FINAL}
    if hybrid.timesteps == "global":
        sequences = {
            DDIM: [
                float(t) for t in ddim_timesteps(n, hybrid.ddim_spacing, schedule.steps_offset, T)
            ],
            DPM_SOLVER: dpm_solver_times(schedule, n, hybrid.dpm_spacing),
        }
        ts = _global_times(schedule, solvers, sequences)
        ss = ts[1:] + [final[solvers[-1]]]  # continuity: each step lands where the next one starts
    elif hybrid.timesteps == "fragmented":
        ts, ss = [], []
        i = 0
        while i < n:  # one run of consecutive steps with the same solver
            j = i
            while j < n and solvers[j] == solvers[i]:
                j += 1
            m = j - i
            if solvers[i] == DDIM:
                own = [
                    float(t)
                    for t in ddim_timesteps(m, hybrid.ddim_spacing, schedule.steps_offset, T)
                ]
                lands = [t - T // m if t - T // m >= 0 else FINAL for t in own]
            else:
                own = dpm_solver_times(schedule, m, hybrid.dpm_spacing)
                lands = own[1:] + [final[DPM_SOLVER] if j == n else CLEAN]
            ts += own
            ss += lands
            i = j
    else:
        raise ValueError(
            f"HybridSchedule.timesteps={hybrid.timesteps!r} is not 'global' or 'fragmented'"
        )
    if solvers[-1] == DPM_SOLVER and ss[-1] == FINAL and ts[-1] <= 0:
        raise ValueError(
            f"HybridSchedule(dpm_spacing={hybrid.dpm_spacing!r}) ends its last step at t = 0, the "
            "level of last_level='final' itself; use last_level='clean'"
        )
    return Plan(
        schedule,
        _with_orders(
            schedule,
            solvers,
            ts,
            ss,
            hybrid.dpm_order,
            hybrid.lower_order_final,
            final_order=hybrid.final_order,
            history=hybrid.history,
            clean_order=hybrid.dpm_order,
        ),
        clip_sample=hybrid.clip_sample,
        clip_sample_range=hybrid.clip_sample_range,
    )


def _global_times(
    schedule: NoiseSchedule, solvers: list[str], sequences: dict[str, list[float]]
) -> list[float]:
    """Global timestep pre-setting (paper Eq. 6): step i takes t_i from the full N-step sequence of
    the solver that runs it, t_i = t_i^DPM on τ_s … τ_e and t_i^DDIM elsewhere, and the plan must
    strictly decrease.

    The two sequences are spaced differently, so at a switch Eq. 6 can repeat or reverse a time:
    DDIM (leading, N = 6) runs 831, 665, 499, 333 and DPM-Solver++ "linspace" starts step 5 at 333
    as well; "trailing" puts step 2 at 832 after DDIM's 831; λ-uniform times fall below later DDIM
    times for a window mid-pass. The rule that keeps every plan valid, for any spacings and window:

    1. A DPM-Solver++ step keeps t_i^DPM (they decrease among themselves).
    2. A DDIM step keeps t_i^DDIM when it lies strictly between the DPM-Solver++ times around it
       (the nearest before, above it; the nearest after, below it; no bound where there is none).
       Eq. 6 literally.
    3. Each maximal block of consecutive DDIM steps that fail 2 (they sit at the ends of a DDIM run)
       is spread uniformly in λ strictly between the kept times on either side of it: k steps
       between λ_a and λ_b take λ_a + j (λ_b − λ_a)/(k+1), j = 1 … k. A block that opens the pass
       starts at T−1 instead (λ_a + (j−1)(λ_b − λ_a)/k); a block that ends it stays above t = 0 (λ_b
       = λ(0)).

    So a plan whose sequences interleave is Eq. 6 unchanged, and otherwise only the offending DDIM
    times move, into the gap they were meant to fill. Example (N = 6, τ = 5…6, "linspace"): 831,
    665, 499, 415.8, then DPM-Solver++ 333, 166 (the DDIM time 333 moves to the λ-midpoint of 499
    and 333).
    """
    n, T = len(solvers), schedule.num_train_timesteps
    fixed = [solver == DPM_SOLVER for solver in solvers]
    ts = [sequences[solver][i] for i, solver in enumerate(solvers)]
    keep = list(fixed)
    for i in range(n):  # rule 2
        if not fixed[i]:
            above = [ts[j] for j in range(i) if fixed[j]]
            below = [ts[j] for j in range(i + 1, n) if fixed[j]]
            keep[i] = (not above or ts[i] < above[-1]) and (not below or ts[i] > below[0])
    i = 0
    while i < n:  # rule 3, block by block
        if keep[i]:
            i += 1
            continue
        j = i
        while j < n and not keep[j]:
            j += 1
        k = j - i  # steps i … j−1 move
        lam_b = schedule.lam(ts[j]) if j < n else schedule.lam(0)
        if i == 0:
            lam_a = schedule.lam(T - 1)
            lams = [lam_a + m * (lam_b - lam_a) / k for m in range(k)]
        else:
            lam_a = schedule.lam(ts[i - 1])
            lams = [lam_a + m * (lam_b - lam_a) / (k + 1) for m in range(1, k + 1)]
        ts[i:j] = [
            float(T - 1) if (i == 0 and m == 0) else schedule.t_of_lam(x)
            for m, x in enumerate(lams)
        ]
        i = j
    # cannot happen by the rules above; a bug if it does
    if not all(a > b for a, b in zip(ts, ts[1:])):
        raise ValueError(
            f"hybrid timesteps {ts} do not strictly decrease; this is a bug in "
            "_global_times, please report the HybridSchedule"
        )
    return ts
