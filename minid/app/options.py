"""The command line's options: the parser every sub-command uses (one-line errors, defaults shown),
the model and face-pack options they share, and the method's options: one table
(`restore.config.METHOD_FLAGS`) from each flag to the field of `RestoreConfig` it sets, dotted
through the nested configs. The parser takes its defaults and limits from the configs, and
`method_config` builds the config from the parsed flags through the same table (`minid restore`,
`minid demo`, `minid calibrate`, `minid validate` and the calibration manifest's per-row overrides).
Last, each sub-command's options (`add_restore_args`, …), which cli.py's `COMMANDS` attaches to the
command that runs them."""

from __future__ import annotations

import argparse


def number_type(kind: type, low, high=None, low_open: bool = False, multiple: int | None = None):
    """An argparse type: a number of `kind` in the limits (low excluded when `low_open`; a multiple
    of `multiple`), NaN and infinities refused; argparse names the flag in the message."""
    from minid.models.config import number_problem

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        problem = number_problem(value, kind, low, high, low_open)
        if problem is None and multiple and value % multiple:
            problem = f"must be a multiple of {multiple}"
        if problem:
            extra = f" (a multiple of {multiple})" if multiple and "multiple" not in problem else ""
            raise argparse.ArgumentTypeError(f"{problem}{extra}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    return parse


def _argparse_type(parse):
    """`parse` (a callable that raises ValueError on a bad text) as an argparse type that says
    why."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def add_method_args(p: argparse.ArgumentParser) -> None:
    from minid.method.editedid import NUMBER_LIMITS
    from minid.models.vae import MIN_SIDE
    from minid.restore.config import METHOD_FLAGS, RestoreConfig, field_of

    defaults = RestoreConfig()
    for flag, (path, kind, text) in METHOD_FLAGS.items():
        choices = kind if isinstance(kind, tuple) else None
        limits = NUMBER_LIMITS.get(path.removeprefix("method."))
        # the config's limits, said in the flag's words before anything loads
        if limits is not None:
            kind = number_type(*limits)
        elif path == "image_size":
            kind = number_type(int, MIN_SIDE, multiple=8)
        elif not choices:
            kind = _argparse_type(kind)
        p.add_argument(
            flag,
            type=None if choices else kind,
            choices=choices,
            default=field_of(defaults, path),
            help=text if "default" in text else f"{text} (default: %(default)s)",
        )


def method_config(args):
    from minid.restore.config import METHOD_FLAGS, RestoreConfig, with_fields
    from minid.sampling.hybrid import HybridSchedule

    steps = args.steps
    start, end = HybridSchedule(
        num_steps=steps, dpm_start=args.dpm_start, dpm_end=args.dpm_end
    ).window()
    # in the flags' words, before the config says it in its fields'
    if not 1 <= start <= end <= steps:
        given = start if args.dpm_start is None else args.dpm_start
        resolved = "" if min(given, args.dpm_end) >= 0 else f" (here steps {start} and {end})"
        first = "the last third" if args.dpm_start is None else args.dpm_start
        raise ValueError(
            f"--dpm-start {first}, --dpm-end {args.dpm_end}{resolved} and --steps {steps} must "
            "satisfy 1 ≤ --dpm-start ≤ --dpm-end ≤ --steps (DPM-Solver++ runs steps --dpm-start "
            "… --dpm-end of the --steps, counted from 1 at pure noise, a negative value from the "
            "end; e.g. --dpm-start -2 --dpm-end -1, the last two)"
        )
    return with_fields(
        RestoreConfig(),
        {
            path: getattr(args, flag.lstrip("-").replace("-", "_"))
            for flag, (path, _, _) in METHOD_FLAGS.items()
        },
    )


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default: appended as "(default: …)" unless the help already
    says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text.lower()
            or not action.option_strings
            or action.default is argparse.SUPPRESS
        ):
            return text
        if action.default is None:
            # "not given", not "none": for some flags (--face-mask) none is a value with a meaning
            return text if action.required else text + " (default: not given)"
        return text if action.default is False else text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minid restore: error: argument --w0: … (minid restore
    --help)`, exit code 2, the code of every user error of the command line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        help="hub folder or single .safetensors file (default: weights/sd-v1-4, "
        "downloaded on first use)",
    )
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU"
    )
    p.add_argument(
        "--seed", type=number_type(int, 0, 2**63 - 1), default=0, help="seed of every random draw"
    )


def add_face_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--face-pack",
        default="buffalo_l",
        help="insightface model pack (detection, landmarks, ArcFace), or its folder",
    )
    p.add_argument(
        "--face-root",
        help="folder of insightface model packs (default ~/.insightface or "
        "$MINID_INSIGHTFACE_ROOT)",
    )
    p.add_argument(
        "--download-faces", action="store_true", help="let insightface fetch the pack if missing"
    )
    p.add_argument(
        "--face-backend",
        choices=("insightface", "dlib"),
        default="insightface",
        help="the face models: insightface (the pack above: SCRFD, 106 landmarks, ArcFace) or dlib "
        "(HOG detector, 5 points, 128-d descriptor measured in dlib distance, not ID-Sim; "
        "pip install dlib-bin face-recognition-models)",
    )


# ---- the options of each sub-command (cli.py runs them) ------------------------------------------


def add_mask_source_arg(p: argparse.ArgumentParser, text: str) -> None:
    """--mask-source, where a face mask comes from when none is given; `text`: its help in the
    command's words."""
    from minid.restore.inputs import MASK_SOURCES

    p.add_argument("--mask-source", choices=MASK_SOURCES, default="landmarks", help=text)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid demo`."""
    add_model_args(p)
    add_method_args(p)
    p.add_argument(
        "--out", default="out/demo", help="folder for the images, masks, w schedule, maps"
    )
    p.add_argument("--prompt", default="a photo of a man", help="the portrait's prompt")
    p.add_argument(
        "--subject-word",
        default="man",
        help="the word of --prompt whose face drifts and is restored",
    )
    p.add_argument(
        "--element",
        default="black glasses",
        help="what the edit adds: the edited prompt is 'PROMPT wearing ELEMENT'",
    )
    p.add_argument(
        "--element-word",
        default="glasses",
        help="the word of --element whose region the edit keeps",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of an earlier demo in --out (default: refuse to write over any file)",
    )
    p.add_argument(
        "--paper-settings",
        action="store_true",
        help="on a CPU too: 20 generation steps and the chosen --inversion (a CPU run takes 10 "
        "generation steps and direct inversion without it: hours at full size otherwise)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the whole demo on a tiny random SD stack (minid.loading.tiny), in seconds, with no "
        "download: a first run and a smoke test of an install; its pictures are noise, the "
        "weights being random (64² images; not with --weights or --image-size)",
    )
    for action in p._actions:  # the method's flags, said as the demo runs them
        if action.dest == "inversion":
            action.help += "; on a CPU the demo runs direct unless --paper-settings or --tiny"
        elif action.dest == "steps":
            action.help += (
                " (the portrait and its edit are generated with 20 steps, 10 on a CPU unless "
                "--paper-settings or --tiny)"
            )


def add_restore_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid restore`."""
    p.add_argument("--original", required=True, help="the photo whose identity is kept")
    p.add_argument("--edited", required=True, help="the edited image whose face drifted")
    p.add_argument("--prompt-original", required=True, help='e.g. "a photo of a man"')
    p.add_argument(
        "--prompt-edited", required=True, help='e.g. "a photo of a man wearing black glasses"'
    )
    p.add_argument("--id-words", nargs="+", required=True, help="identity words, e.g. man face")
    p.add_argument(
        "--element-words",
        nargs="*",
        default=[],
        help="edited elements, e.g. glasses (default: none; then --element-mask is needed)",
    )
    p.add_argument(
        "--face-mask",
        help="PNG, white = face region of the original; 'none': IdGlow's mask-free mode "
        "(no mask, no blending: T's self-attention at the gated layers attends over T's and O's "
        "keys and values together, O's share --identity-schedule) (default: not given, the mask "
        "comes from --mask-source)",
    )
    p.add_argument(
        "--regions",
        help="ConsistentID's fine-grained regions instead of a face mask, from the "
        "original's landmarks: REGION=original|edited[:λ] joined by commas (regions "
        "eyes, brows, nose, mouth, skin), e.g. eyes=original,mouth=edited, or a "
        "JSON file",
    )
    p.add_argument("--element-mask", help="PNG, white = edited element region of the edited image")
    p.add_argument(
        "--out", required=True, help="output image, PNG or JPEG (never written over an input)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out and --save-intermediates files (default: refuse; inputs, "
        "masks "
        "included, are never written over)",
    )
    p.add_argument(
        "--save-intermediates",
        metavar="DIR",
        help="write reconstructions, masks, the w schedule and attention maps here",
    )
    add_mask_source_arg(
        p,
        "face mask when --face-mask is not given: from the original's face landmarks (needs "
        "the face models) or from the cross-attention maps of the identity words (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--multi-face",
        action="store_true",
        help="restore every face: detect and pair faces in both images, restore all in one batch",
    )
    p.add_argument(
        "--pairs", help="with --multi-face: which faces, as original:edited indices, e.g. 0:1,2:0"
    )
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when the pictures (3 bytes a pixel each, and a copy of the edited one) "
        "do not fit in the memory this machine has available",
    )
    p.add_argument(
        "--no-registration-check",
        action="store_true",
        help="restore even when the edit's face does not line up with the original's after "
        "registration (another pose, or another face): the mixing then blends two faces",
    )
    add_face_args(p)
    add_model_args(p)
    add_method_args(p)


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid calibrate`."""
    from minid.dataset.manifest import OPTIONAL, OVERRIDES, REQUIRED

    p.add_argument(
        "manifest",
        help=f"CSV or JSON Lines, one row per pair (UTF-8; paths relative to the manifest). "
        f"Columns: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)}; and per-row "
        f"overrides of the method flags, named like the flag: {', '.join(OVERRIDES)}",
    )
    p.add_argument(
        "--out", required=True, help="folder for results/<id>.png, results.jsonl/.csv, summary.json"
    )
    p.add_argument(
        "--batch",
        type=number_type(int, 1),
        default=1,
        help="K: consecutive manifest rows restored in one batch",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help='local: this process; ray: Ray Data actors (pip install -e ".[scale]")',
    )
    p.add_argument(
        "--ray-address", help="join this Ray cluster (e.g. auto); default: start Ray here"
    )
    p.add_argument(
        "--num-workers",
        type=number_type(int, 1),
        default=1,
        help="ray: actors, each with one copy of the model",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=number_type(float, 0.0),
        help="ray: GPUs per actor (default: 1 with --device cuda or a GPU here, else 0)",
    )
    p.add_argument(
        "--threads",
        type=number_type(int, 1),
        help="torch's CPU threads for each row, on either engine, so that a row's image does not "
        "depend on the engine (default: torch's count in this process; Ray actors get the same)",
    )
    p.add_argument(
        "--save-intermediates",
        action="store_true",
        help="also write each row's reconstructions, masks, w schedule and attention maps",
    )
    add_mask_source_arg(
        p,
        "face mask of a row without face_mask: the original's landmarks (face pack) or the "
        "cross-attention maps of its identity words",
    )
    p.add_argument(
        "--id-sim",
        action="store_true",
        help="measure ID-Sim before and after with the face pack (always with --mask-source "
        "landmarks)",
    )
    add_face_args(p)
    add_model_args(p)
    add_method_args(p)


def add_validate_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid validate`."""
    p.add_argument(
        "--pairs",
        required=True,
        help="folder with original/ and edited/ sub-folders of equally named images",
    )
    p.add_argument(
        "--out", help="where validate.csv, .json, .md and .png go (default: the --pairs folder)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier validate in --out (default: refuse; inputs are never "
        "written over)",
    )
    p.add_argument(
        "--prompt-original", default="a photo of a person", help="every original's prompt"
    )
    p.add_argument(
        "--prompt-edited", default="a photo of a person", help="every edited image's prompt"
    )
    p.add_argument(
        "--id-words", nargs="+", default=["person"], help="identity words, in both prompts"
    )
    p.add_argument(
        "--element-words",
        nargs="*",
        default=[],
        help="edited elements, in --prompt-edited (default: none; then the face is restored and "
        "everything "
        "else is kept from the edit)",
    )
    add_mask_source_arg(
        p,
        "face mask: from the original's face landmarks (face models; without them, from "
        "attention) or from the cross-attention maps of the identity words",
    )
    p.add_argument(
        "--min-psnr",
        type=number_type(float, 0.0),
        default=25.0,
        help="the PSNR, in dB, both reconstructions of a pair must reach (the paper's consistency "
        "bar)",
    )
    add_face_args(p)
    add_model_args(p)
    add_method_args(p)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid generate`."""
    p.add_argument("--prompt", required=True, help="what to draw (SD1.4 reads its first 75 tokens)")
    p.add_argument("--out", required=True, help="output image, PNG or JPEG")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (default: refuse)"
    )
    from minid.sampling.guided import MAX_GUIDANCE
    from minid.sampling.text_to_image import max_steps

    p.add_argument(
        "--steps",
        type=number_type(int, 1, max_steps("ddim")),  # the schedule's; --solver dpm: one fewer
        default=50,
        help="sampling steps, one UNet call each",
    )
    p.add_argument(
        "--guidance",
        type=number_type(float, 0.0, MAX_GUIDANCE, low_open=True),
        default=7.5,
        help="classifier-free guidance scale",
    )
    from minid.sampling.text_to_image import SOLVERS

    p.add_argument(
        "--solver",
        choices=SOLVERS,
        default="ddim",
        help="DDIM, DPM-Solver++ on every step, or EditedID's hybrid",
    )
    p.add_argument(
        "--size",
        type=number_type(int, 64, multiple=8),
        default=512,
        help="side of the square image in pixels, a multiple of 8 of at least 64",
    )
    add_model_args(p)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid eval`."""
    p.add_argument(
        "folder", help="with original/, edited/ and result/ sub-folders of equally named images"
    )
    p.add_argument("--out", help="where metrics.csv and metrics.json go (default: the folder)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing metrics.csv and metrics.json (default: refuse)",
    )
    p.add_argument(
        "--max-faces",
        type=number_type(int, 1),
        default=64,
        help="the best-scored faces measured per image; an image with more gets a note in its row "
        "(default: 64)",
    )
    add_face_args(p)


def add_profile_args(p: argparse.ArgumentParser) -> None:
    """The options of `minid profile`; the epilog says what each column of its tables means."""
    from minid.app.profile import ATTENTION, MAPS, STEPS
    from minid.app.profile_report import COLUMNS

    class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Options as everywhere; the epilog's column table kept as written."""

    p.formatter_class = Formatter
    p.description = (
        "One UNet step under torch.profiler (random weights at the chosen size): a Chrome\n"
        "trace, then time, FLOP, bytes and rates per attention site and per kernel family."
    )
    p.epilog = COLUMNS
    p.add_argument(
        "--step",
        choices=STEPS,
        default="denoise",
        help="one denoising step, or one EditedID Stage 3 step (attentional gating of (O, E, T))",
    )
    p.add_argument(
        "--unet",
        choices=("sd14", "tiny"),
        default="sd14",
        help="the UNet's size: SD1.4's, or the tiny test configuration (random weights)",
    )
    p.add_argument(
        "--latent",
        type=number_type(int, 8, multiple=8),
        help="latent side, a multiple of 8 (default: the config's, 64 for SD1.4 = a 512² image, "
        "16 for tiny)",
    )
    p.add_argument(
        "--batch",
        type=number_type(int, 1),
        default=1,
        help="images in the batch: 2 UNet rows each for a denoising step, 6 (an O, E, T triple) "
        "for Stage 3; half that with --no-guidance",
    )
    p.add_argument(
        "--no-guidance",
        action="store_true",
        help="no unconditional half in the batch (guidance scale 1)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="auto",
        help="sdpa: PyTorch's SDPA at every site (denoising only); auto, torch, triton: every site "
        "through minid's kernels' ops on that backend",
    )
    p.add_argument(
        "--maps",
        choices=MAPS,
        default="cross",
        help="the sites whose head-averaged map a denoising step asks for (cross: what an "
        "attention store keeps)",
    )
    p.add_argument(
        "--gating-mode",
        choices=("output", "map"),
        default="output",
        help="Stage 3's self-attention gating: blend outputs or maps (GatingConfig.mode)",
    )
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU"
    )
    p.add_argument(
        "--warmup",
        type=number_type(int, 0),
        default=1,
        help="unprofiled steps first (Triton compilation, allocator, autotuning)",
    )
    p.add_argument(
        "--repeat",
        type=number_type(int, 1),
        default=3,
        help="profiled steps; the tables give the mean per step",
    )
    p.add_argument(
        "--trace", default="out/profile-trace.json", help="where the Chrome trace is written"
    )
    p.add_argument(
        "--seed", type=number_type(int, 0, 2**63 - 1), default=0, help="seed of the random weights"
    )


def add_download_args(p: argparse.ArgumentParser) -> None:
    from minid.loading.checkpoint import DEFAULT_WEIGHTS
    from minid.loading.download import REPO_ID, REVISION

    p.add_argument("--dest", default=str(DEFAULT_WEIGHTS), help="folder for the hub files")
    p.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        help="weights to fetch (default: what this machine runs: fp16 with a CUDA GPU, 2.1 GB; "
        "fp32 on a CPU, 4.3 GB)",
    )
    p.add_argument("--repo", default=REPO_ID, help="hub repository")
    p.add_argument("--revision", default=REVISION, help="pinned commit the manifest describes")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="pickle checkpoint (.ckpt, .bin, .pt, .pth), read with weights_only=True"
    )
    p.add_argument(
        "dst", nargs="?", help="output .safetensors (default: SRC with the suffix .safetensors)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing DST (default: refuse)"
    )


def add_keymap_args(p: argparse.ArgumentParser) -> None:
    """`minid keymap` takes no options."""


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("layouts", help="layouts.json with the hub's LFS pointers")
    p.add_argument("hub_folder", help="a folder holding the hub's small files")
