"""How pictures go through the method (`RestoreConfig`, the method's own config nested in it), and
the one table of the settings a user may give by name (`METHOD_FLAGS`): the command line's method
flags and the calibration manifest's per-row columns are both read through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minid.kernels.dispatch import BACKENDS
from minid.method.editedid import ABLATIONS, INVERSIONS, EditedIDConfig
from minid.method.gating import GATING_MODES, IdentitySchedule
from minid.models.vae import MIN_SIDE
from minid.sampling.schedule import DPM_SPACINGS


@dataclass(frozen=True)
class RestoreConfig:
    """How pictures go through the method: the method's own settings nested, and the image-side
    ones."""

    method: EditedIDConfig = EditedIDConfig()
    # side of the square the models work on (SD1.4: 512; a multiple of 8, the VAE's factor)
    image_size: int = 512
    # encode with a posterior sample (seeded per pair) instead of its mean
    sample_posterior: bool = False
    # σ of the blur that softens a landmark face mask, as a fraction of image_size (4 px at 512), so
    # a setting means the same on the tests' 64² squares as on SD's 512²
    face_mask_feather: float = 1 / 128
    # The fused attention edits of Stage 3: "auto" = Triton kernels on CUDA, the PyTorch path
    # elsewhere; "triton" or "torch" to force one (the same semantics; tests compare them).
    attention_backend: str = "auto"

    def __post_init__(self):
        if (
            not isinstance(self.image_size, int)
            or self.image_size % 8
            or self.image_size < MIN_SIDE
        ):
            raise ValueError(
                f"RestoreConfig.image_size must be a multiple of 8 (the VAE's factor) of at least "
                f"{MIN_SIDE}, got {self.image_size!r}"
            )
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"RestoreConfig.attention_backend must be 'auto', 'triton' or 'torch', got "
                f"{self.attention_backend!r}"
            )


# Every method setting a user may give by name: flag -> (field of RestoreConfig, dotted through the
# nested configs, kind, help). The kind is a tuple of choices or a callable that raises ValueError
# on a bad text. The command line takes its defaults from the config and builds the config from the
# parsed flags through this one table (app/options.py); a calibration manifest's override columns
# are its flags' names.
METHOD_FLAGS = {
    "--steps": ("method.solver.num_steps", int, "inversion and reconstruction steps N"),
    "--guidance": ("method.guidance", float, "classifier-free guidance scale s of reconstruction"),
    "--w0": (
        "method.mixing.w0",
        float,
        "initial mixing weight w_0 of Stage 1 (Eq. 2; the authors' INIT_NUM, 0-0.1)",
    ),
    "--forced-steps": (
        "method.mixing.forced_steps",
        int,
        "final inversion steps forced to w = 0.5 (Eq. 3; the authors' FINA_STEP)",
    ),
    "--w-lr": (
        "method.mixing.lr",
        float,
        "η, the step of w on the alignment loss normalised by D (default: from "
        "N, the gap to 0.5 down to half by the last free step: 0.020 at N = 6)",
    ),
    "--dpm-start": (
        "method.solver.dpm_start",
        int,
        "first DPM-Solver++ step τ_s (1-based from noise; negative counts from the end, -1 = the "
        "last step; with --dpm-end the authors' TOTAL_STEPS_DPM, the same in inversion and "
        "reconstruction) (default: the last third of the steps, round(N/3) of them: 5 at N = 6, "
        "14 at N = 20)",
    ),
    "--dpm-end": ("method.solver.dpm_end", int, "last DPM-Solver++ step τ_e (as --dpm-start)"),
    "--dpm-spacing": (
        "method.solver.dpm_spacing",
        DPM_SPACINGS,
        "timesteps of the DPM-Solver++ steps: uniform in λ (logSNR, paper A.4's log-uniform), "
        "or diffusers' spacings",
    ),
    "--inversion": (
        "method.inversion",
        INVERSIONS,
        "Stage 2: null-text optimisation (the paper); direct (PnP Inversion's add-source "
        "variant: O and E put back on their pivots, T corrected as E, so their PSNR is the VAE's); "
        "or negative-prompt (∅ = the prompt, a preview that cannot undo Stage 1's mixing: with "
        "one prompt for both images, O and E come back as one image)",
    ),
    "--null-inner-steps": (
        "method.null_text.inner_steps",
        int,
        "null-text Adam updates per step at most",
    ),
    "--loss-scale": (
        "method.null_text.loss_scale",
        float,
        "null-text's loss is multiplied by this while its gradient crosses the UNet (fp16 needs "
        "it)",
    ),
    "--gating-mode": (
        "method.gating.mode",
        GATING_MODES,
        "Stage 3 gating: blend attention outputs, or maps (Eq. 7-8)",
    ),
    "--lambda-o": (
        "method.gating.lambda_o",
        float,
        "weight of O where the face and element masks overlap (λ_E = 1 − λ_O: the authors' "
        "OVERLAP_WEIGHT, a + b = 1)",
    ),
    "--identity-schedule": (
        "method.gating.identity",
        IdentitySchedule,
        "IdGlow's schedule of O's share s by noise level, p = 1 − σ/(α+σ) from 0 (pure noise) "
        "to 1 (clean), the same for any --steps: constant, decay:S_START:S_END (linear in p), "
        "window:A:B:S_IN:S_OUT (S_IN where A ≤ p < B); by step number: decay-steps:S_START:S_END, "
        "window-steps:A:B:S_IN:S_OUT (steps 1-based, [A, B)); or a product joined by '*'",
    ),
    "--ablation": ("method.ablation", ABLATIONS, "switch a component off (paper Table 7)"),
    "--image-size": ("image_size", int, "side the models work at (SD1.4: 512)"),
}


def field_of(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def with_fields(config, values: dict[str, object]):
    """`config` with the fields at the dotted paths of `values` set, each nested frozen config
    rebuilt once (so its checks see all of its new values together)."""
    here, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            here[head] = value
    here.update({head: with_fields(getattr(config, head), inner) for head, inner in nested.items()})
    return dataclasses.replace(config, **here)
