"""The noise schedule of a discrete-time diffusion model, and the timestep sequences samplers walk
along.

Notation (the same names in samplers.py and docs/editedid.md):

    | symbol                  | code name             | meaning                                 |
    |-------------------------|-----------------------|-----------------------------------------|
    | β_t                     | `betas`               | noise variance of forward step t        |
    | ᾱ_t = Π_{k≤t} (1 − β_k) | `alphas_cumprod[t]`   | signal variance after t+1 forward steps |
    | α_t = sqrt(ᾱ_t)         | `alpha(t)`            | signal scale: z_t = α_t x_0 + σ_t ε     |
    | σ_t = sqrt(1 − ᾱ_t)     | `sigma(t)`            | noise scale                             |
    | λ_t = log(α_t / σ_t)    | `lam(t)`              | half log-SNR; decreases as t grows      |
    | T                       | `num_train_timesteps` | 1000 for SD; timesteps 0 … T−1          |

A *time* here is a float on the training axis [0, T−1]. Integer times index `alphas_cumprod`
directly; a fractional time (a λ-uniform sequence needs them) takes λ by linear interpolation
between the two integer neighbours, and `t_of_lam` inverts that interpolation. Interpolating λ (=
−log of the "Karras sigma" σ/α) is what diffusers' DPMSolverMultistepScheduler does to turn λ values
into timesteps, so the rounded timesteps here equal its `use_lu_lambdas=True` timesteps.
(DPM-Solver's `NoiseScheduleVP('discrete')` interpolates log α instead; both agree at integer times
and differ by far less than a timestep in between.)

Two levels lie below the training axis, where a pass lands after its last step (`Level`: floats, so
λ, ᾱ and the arithmetic work on them, but told apart by identity, never by comparing float values;
any other time below 0 is an error):
    FINAL (where DDIM's t − T//N < 0 lands): ᾱ = `final_alphas_cumprod`, which is 1 when the
        scheduler config says `set_alpha_to_one`, else ᾱ_0 (SD1.x: False, so DDIM's last step lands
        on the noise level of timestep 0 and keeps σ_0 ≈ 0.029 of noise in the latent, as diffusers
        does).
    CLEAN (−∞): ᾱ = 1, σ = 0, λ = +∞: clean data. DPM-Solver++ ends here (diffusers'
    `final_sigmas_type="zero"`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch


class Level(float, enum.Enum):
    """The two noise levels below the training axis (see the module docstring)."""

    FINAL = -1.0  # the level after DDIM's last step: ᾱ = final_alphas_cumprod
    CLEAN = -math.inf  # clean data: ᾱ = 1, σ = 0, λ = +∞


FINAL, CLEAN = Level.FINAL, Level.CLEAN


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … T−1 (float64) and what the samplers derive from it.

    Build it with `scaled_linear()` (SD1.x), `linear()`, `from_betas()` or `from_config()` (a
    diffusers `scheduler/scheduler_config.json` dict). Computations are in float64: a sampler's
    coefficients are Python floats, so the latent's own dtype decides the precision of each step.
    """

    alphas_cumprod: torch.Tensor  # (T,) float64, ᾱ_t, decreasing from ≈1 to ≈0
    final_alphas_cumprod: float  # ᾱ of the FINAL level (see module docstring): 1.0 or ᾱ_0
    # added to DDIM "leading" timesteps (SD1.x: 1, so 6 steps end at timestep 1)
    steps_offset: int = 1

    def __post_init__(self):
        a = self.alphas_cumprod
        if a.ndim != 1 or a.dtype != torch.float64:
            raise ValueError(
                f"alphas_cumprod must be a 1-D float64 tensor, found {tuple(a.shape)} "
                f"{a.dtype}; build the schedule with NoiseSchedule.from_betas(...)"
            )
        if not bool(((a > 0) & (a <= 1)).all()) or not bool((a[1:] < a[:-1]).all()):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1] and strictly decrease; "
                "check that every beta is in (0, 1)"
            )

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_betas(
        cls, betas: torch.Tensor, set_alpha_to_one: bool = False, steps_offset: int = 1
    ) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ᾱ_t = Π_{k≤t} (1 − β_k)
        final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, steps_offset)

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        set_alpha_to_one: bool = False,
        steps_offset: int = 1,
    ) -> "NoiseSchedule":
        """SD1.x's schedule (latent diffusion): sqrt(β) is linear in t, i.e. β_t =
        linspace(√β_start, √β_end)²."""
        sqrt_betas = torch.linspace(
            beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64
        )
        return cls.from_betas(sqrt_betas**2, set_alpha_to_one, steps_offset)

    @classmethod
    def linear(
        cls,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        set_alpha_to_one: bool = False,
        steps_offset: int = 0,
    ) -> "NoiseSchedule":
        """DDPM's schedule: β linear in t."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas, set_alpha_to_one, steps_offset)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict (SD1.4: PNDMScheduler's, scaled_linear,
        offset 1)."""
        kind = config.get("beta_schedule", "linear")
        common = dict(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            set_alpha_to_one=config.get("set_alpha_to_one", False),
            steps_offset=config.get("steps_offset", 0),
        )
        if config.get("trained_betas") is not None:
            return cls.from_betas(
                torch.tensor(config["trained_betas"]),
                common["set_alpha_to_one"],
                common["steps_offset"],
            )
        if kind not in ("scaled_linear", "linear"):
            raise ValueError(
                f"scheduler config beta_schedule={kind!r} is not supported; "
                "expected 'scaled_linear' (SD1.x) or 'linear'"
            )
        build = cls.scaled_linear if kind == "scaled_linear" else cls.linear
        return build(
            config.get("beta_start", 0.00085 if kind == "scaled_linear" else 0.0001),
            config.get("beta_end", 0.012 if kind == "scaled_linear" else 0.02),
            **common,
        )

    # ---- α, σ, λ at a time -----------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def lams(self) -> torch.Tensor:
        """λ_t at every integer time, (T,) float64, decreasing. λ = ½ log(ᾱ / (1 − ᾱ))."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    def alphas_cumprod_at(self, t: float) -> float:
        """ᾱ at a time: table value at integers, interpolated in λ between them; the levels FINAL
        and CLEAN."""
        if t is CLEAN:
            return 1.0
        if t is FINAL:
            return self.final_alphas_cumprod
        t = float(t)
        if t < 0:
            raise ValueError(
                f"time {t} is below 0; a pass ends at the levels schedule.FINAL (DDIM) or "
                "schedule.CLEAN (DPM-Solver++), which are named, not negative numbers"
            )
        if t > self.num_train_timesteps - 1:
            raise ValueError(
                f"time {t} is past the last training timestep {self.num_train_timesteps - 1}"
            )
        if t == int(t):
            return float(self.alphas_cumprod[int(t)])
        return 1.0 / (1.0 + math.exp(-2.0 * self.lam(t)))  # ᾱ = sigmoid(2λ)

    def alpha(self, t: float) -> float:
        return math.sqrt(self.alphas_cumprod_at(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(1.0 - self.alphas_cumprod_at(t))

    def lam(self, t: float) -> float:
        """λ_t = log α_t − log σ_t; +∞ at CLEAN (and at FINAL when set_alpha_to_one)."""
        if isinstance(t, Level):
            a = self.alphas_cumprod_at(t)
            return math.inf if a == 1.0 else 0.5 * (math.log(a) - math.log1p(-a))
        t = float(t)
        if t < 0:
            self.alphas_cumprod_at(t)  # raises: not a level
        lo = min(int(math.floor(t)), self.num_train_timesteps - 2)
        w = t - lo
        lams = self.lams
        return float((1 - w) * lams[lo] + w * lams[lo + 1])

    def t_of_lam(self, lam: float) -> float:
        """The time whose λ is `lam` (inverse of the piecewise-linear λ(t)); clamped to [0, T−1]."""
        lams = self.lams.flip(0)  # increasing in λ; index j ↔ time T−1−j
        if lam <= float(lams[0]):
            return float(self.num_train_timesteps - 1)
        if lam >= float(lams[-1]):
            return 0.0
        # lams[j] ≤ lam < lams[j+1]
        j = int(torch.searchsorted(lams, torch.tensor([lam], dtype=torch.float64))[0]) - 1
        w = (lam - float(lams[j])) / float(lams[j + 1] - lams[j])
        return (self.num_train_timesteps - 1 - j) - w


# ---- timestep sequences --------------------------------------------------------------------------
# Each returns the N times a sampler evaluates the model at, from the noisiest, as diffusers'
# `set_timesteps` does for the same options (Lin et al. 2023, "Common Diffusion Noise Schedules and
# Sample Steps are Flawed", Table 2, names the spacings). Where each step lands is the sampler's
# business (samplers.py, the plans).


def ddim_timesteps(
    num_steps: int, spacing: str = "leading", steps_offset: int = 1, num_train_timesteps: int = 1000
) -> list[int]:
    """DDIMScheduler's timesteps.

    leading:  k · (T//N) + steps_offset for k = N−1 … 0   (SD, N=6: 831, 665, 499, 333, 167, 1)
    trailing: round(T − k · T/N) − 1 for k = 0 … N−1    (starts at T−1, the purest noise)
    linspace: round(linspace(0, T−1, N)), reversed      (both ends, 0 included)

    DDIM's step from t always goes to t − T//N (diffusers' convention, whatever the spacing), so
    with "leading" each step lands on the next timestep and the last one on 1 − T//N < 0, i.e. the
    FINAL level.
    """
    _check_num_steps(num_steps, num_train_timesteps)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = [k * ratio + steps_offset for k in range(num_steps)]
    elif spacing == "trailing":
        ts = _trailing(num_train_timesteps, num_steps)[::-1]
    elif spacing == "linspace":
        step = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 0.0
        ts = [round(k * step) for k in range(num_steps)]  # k·step, as numpy.linspace computes it
    else:
        raise ValueError(
            f"DDIM timestep spacing {spacing!r} is not one of 'leading', 'trailing', 'linspace'"
        )
    if max(ts) > num_train_timesteps - 1:
        raise ValueError(
            f"steps_offset={steps_offset} pushes the first DDIM timestep to {max(ts)}, "
            f"past {num_train_timesteps - 1}; use a smaller offset or 'trailing' spacing"
        )
    return ts[::-1]


DPM_SPACINGS = ("logSNR", "linspace", "leading", "trailing")  # what `dpm_solver_times` accepts


def dpm_solver_times(
    schedule: NoiseSchedule, num_steps: int, spacing: str = "logSNR"
) -> list[float]:
    """DPMSolverMultistepScheduler's N times, noisiest first; the solver then goes on to CLEAN.

    logSNR:   λ uniform from λ(T−1) to λ(0), N points with both ends (Lu et al. 2022, DPM-Solver,
              App. D.1; diffusers `use_lu_lambdas=True`). The times are fractional: the solver uses
              the exact λ-uniform levels, the model sees the rounded timestep (`round(t)`), as
              diffusers does.
    The three spacings of diffusers' `timestep_spacing` (Lin et al. 2023, Table 2), as its
    DPMSolverMultistep- Scheduler computes them (`set_timesteps`, `lambda_min_clipped` = −∞, so its
    "last_timestep" is T); integers:
    linspace: round(linspace(0, T−1, N+1)), reversed, the last (0) dropped   (N = 6: 999, 832, 666,
    500, 333, 166;
              diffusers' default, hence what SD1.4's scheduler config gives)
    leading:  k · (T//(N+1)) + steps_offset for k = N … 1                      (N = 6: 853, 711,
    569, 427, 285, 143)
              (note N+1, not DDIM's N: the pass ends at CLEAN, one level below the last time)
    trailing: round(T − k · T/N) − 1 for k = 0 … N−1                          (N = 6: 999, 832, 666,
    499, 332, 166)

    No spacing repeats a time for N ≤ T−1 (leading's ratio T//(N+1) ≥ 1), so there are no duplicates
    to drop; diffusers drops none either.
    """
    T = schedule.num_train_timesteps
    _check_num_steps(num_steps, T)
    if spacing == "logSNR":
        lam_max_noise, lam_clean = schedule.lam(T - 1), schedule.lam(0)
        if num_steps == 1:
            return [float(T - 1)]
        lams = [
            lam_max_noise + k * (lam_clean - lam_max_noise) / (num_steps - 1)
            for k in range(num_steps)
        ]
        # the ends exactly: interpolation round trips are exact only to float rounding
        return [float(T - 1)] + [schedule.t_of_lam(x) for x in lams[1:-1]] + [0.0]
    if spacing == "linspace":
        step = (T - 1) / num_steps
        # k·step, as numpy.linspace computes it
        return [float(round(k * step)) for k in range(num_steps, 0, -1)]
    if spacing == "leading":
        ratio = T // (num_steps + 1)
        if ratio == 0:
            raise ValueError(
                f"'leading' DPM-Solver++ spacing needs num_steps < {T}, got {num_steps}; "
                "use 'linspace' or 'trailing'"
            )
        ts = [k * ratio + schedule.steps_offset for k in range(num_steps, 0, -1)]
        if ts[0] > T - 1:
            raise ValueError(
                f"steps_offset={schedule.steps_offset} pushes the first DPM-Solver++ "
                f"timestep to {ts[0]}, past {T - 1}; use fewer steps or 'trailing' spacing"
            )
        return [float(t) for t in ts]
    if spacing == "trailing":
        return [float(t) for t in _trailing(T, num_steps)]
    raise ValueError(
        f"DPM-Solver++ timestep spacing {spacing!r} is not one of "
        f"{', '.join(repr(s) for s in DPM_SPACINGS)}"
    )


def max_num_steps(
    schedule: NoiseSchedule, ddim_spacing: str = "leading", dpm_spacing: str | None = None
) -> int:
    """The most steps a pass may take on `schedule`: the largest N whose DDIM timesteps (and, with
    `dpm_spacing`, DPM-Solver++ times) all lie within 0 … T−1. The range the command line and the
    configs state. SD1.4 (T = 1000, steps_offset 1, "leading"): 999 for DDIM, 998 with DPM-Solver++
    ("leading" puts N·(T//(N+1)) + 1 first)."""
    T = schedule.num_train_timesteps
    ddim_timesteps(1, ddim_spacing, schedule.steps_offset, T)  # an unknown spacing raises here
    if dpm_spacing is not None:
        dpm_solver_times(schedule, 1, dpm_spacing)
    for n in range(T, 0, -1):
        try:
            ddim_timesteps(n, ddim_spacing, schedule.steps_offset, T)
            if dpm_spacing is not None:
                dpm_solver_times(schedule, n, dpm_spacing)
        except ValueError:
            continue
        return n
    raise ValueError(f"steps_offset={schedule.steps_offset} leaves no step within 0 … {T - 1}")


def _trailing(num_train_timesteps: int, num_steps: int) -> list[int]:
    """ "trailing" timesteps, noisiest first: round(T − k·T/N) − 1, k = 0 … N−1, with the values
    exactly as diffusers' `np.arange(T, 0, −T/N)` makes them: numpy fills an arange as start + k·δ
    with δ = (start + step) − start, which differs from k·(T/N) by one rounding and flips a .5 (N =
    48: 937 vs 936). (numpy's arange has N+1 elements for some N, e.g. 61, the last one ≈ 0, so
    diffusers' sequence then ends at −1; only the first N are taken here.)"""
    step = -num_train_timesteps / num_steps
    delta = (num_train_timesteps + step) - num_train_timesteps
    return [round(num_train_timesteps + k * delta) - 1 for k in range(num_steps)]


def model_timestep(t: float) -> int:
    """The integer timestep the network is told for a solver time t (round half to even, like
    numpy)."""
    return int(round(float(t)))


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must be in [1, {num_train_timesteps}] "
            "(one model call per step, at most one per training timestep)"
        )
