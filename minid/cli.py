"""The `minid` command: demo, restore, generate, eval, download, convert, keymap.

Each sub-command is a thin layer over a library function; the heavy imports happen inside the command, so
`minid --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        # fp16 halves memory and time on a GPU; CPUs run fp32 far better than fp16.
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise SystemExit(f"minid: --dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("minid: --device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device, dtypes[dtype]


def _load(args):
    """Load SD1.4 from --weights, or from weights/sd-v1-4, downloaded and verified first when needed."""
    from minid import checkpoint, weights

    device, dtype = _device_and_dtype(args.device, args.dtype)
    if args.weights is None:
        source = checkpoint.DEFAULT_WEIGHTS
        # Verifies what is there (no network needed when every file is present) and fetches what is not.
        weights.download(source, precision="fp32" if dtype == _torch().float32 else "fp16")
    else:
        source = Path(args.weights)
    print(f"minid: loading {source} as {str(dtype).removeprefix('torch.')} on {device}", file=sys.stderr)
    return checkpoint.load_stable_diffusion(source, dtype=dtype, device=device)


def _torch():
    import torch

    return torch


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="hub folder or single .safetensors file (default: weights/sd-v1-4, "
                                     "downloaded on first use)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)


# Every method option of the command line: flag -> (field of RestoreConfig, dotted through the nested configs,
# type, help). The parser takes its defaults from the config, and `_method_config` builds the config from the
# parsed flags through this one table.
METHOD_FLAGS = {
    "--steps": ("method.solver.num_steps", int, "inversion and reconstruction steps N"),
    "--guidance": ("method.guidance", float, "classifier-free guidance scale s of reconstruction"),
    "--w0": ("method.mixing.w0", float, "initial mixing weight w_0 of Stage 1 (Eq. 2)"),
    "--w-lr": ("method.mixing.lr", float, "gradient step of w on the alignment loss"),
    "--dpm-start": ("method.solver.dpm_start", int, "first DPM-Solver++ step τ_s (1-based, from noise)"),
    "--dpm-end": ("method.solver.dpm_end", int, "last DPM-Solver++ step τ_e"),
    "--inversion": ("method.inversion", ("null-text", "direct", "negative-prompt"),
                    "Stage 2: null-text optimisation (the paper), direct inversion or negative-prompt inversion"),
    "--null-inner-steps": ("method.null_text.inner_steps", int, "null-text Adam updates per step at most"),
    "--gating-mode": ("method.gating.mode", ("output", "map"),
                      "Stage 3 gating: blend attention outputs, or maps (Eq. 7-8)"),
    "--lambda-o": ("method.gating.lambda_o", float, "weight of O where the face and element masks overlap"),
    "--ablation": ("method.ablation", ("none", "baseline", "no_alignment", "no_disentanglement", "no_entanglement"),
                   "switch a component off (paper Table 7)"),
    "--image-size": ("image_size", int, "side the models work at (SD1.4: 512)"),
}


def _field(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _with(config, values: dict[str, object]):
    """`config` with the fields at the dotted paths of `values` set, each nested frozen config rebuilt once
    (so its checks see all of its new values together)."""
    here, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            here[head] = value
    here.update({head: _with(getattr(config, head), inner) for head, inner in nested.items()})
    return dataclasses.replace(config, **here)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from minid.restore import RestoreConfig

    defaults = RestoreConfig()
    for flag, (path, kind, text) in METHOD_FLAGS.items():
        choices = kind if isinstance(kind, tuple) else None
        p.add_argument(flag, type=None if choices else kind, choices=choices, default=_field(defaults, path),
                       help=f"{text} (default: %(default)s)")


def _method_config(args):
    from minid.restore import RestoreConfig

    return _with(RestoreConfig(), {path: getattr(args, flag.lstrip("-").replace("-", "_"))
                                   for flag, (path, _, _) in METHOD_FLAGS.items()})


def cmd_demo(args) -> int:
    from minid.generate import demo, demo_settings, demo_unet_images, seconds_per_unet_image

    sd = _load(args)
    config = _method_config(args)
    device = str(next(sd.unet.parameters()).device)
    steps, method = demo_settings(device, config.method, args.paper_settings)
    per_image = seconds_per_unet_image(sd, args.image_size)
    paper = sum(demo_unet_images(*demo_settings(device, config.method, True)).values()) * per_image
    chosen = sum(demo_unet_images(steps, method).values()) * per_image
    print(f"minid demo: one image through the UNet takes {per_image:.2f} s here; the paper's settings would take "
          f"about {paper / 60:.0f} min", file=sys.stderr)
    if method is not config.method:
        print(f"minid demo: on this CPU it runs {steps} generation steps and direct inversion instead, about "
              f"{chosen / 60:.0f} min (--paper-settings runs the paper's)", file=sys.stderr)
    paths = demo(sd, args.out, prompt=args.prompt, subject_word=args.subject_word, element=args.element,
                 element_word=args.element_word, seed=args.seed, size=args.image_size, generate_steps=steps,
                 config=dataclasses.replace(config, method=method))
    print("minid demo: wrote")
    for name, path in paths.items():
        print(f"  {name:24s} {path}")
    return 0


def _face_analyzer(args):
    from minid.faces import FaceAnalyzer

    return FaceAnalyzer.from_pack(args.face_pack, root=args.face_root, download=args.download_faces)


def _pairs(text: str | None):
    """"0:1,2:0" -> [(0, 1), (2, 0)]: (face index in the original, face index in the edited image)."""
    if text is None:
        return None
    try:
        return [tuple(int(i) for i in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--pairs must look like 0:1,2:0 (original face : edited face), got {text!r}") from None


def cmd_restore(args) -> int:
    from minid import images
    from minid.multiface import restore_faces
    from minid.restore import EditedID

    out = Path(args.out)
    inputs = [Path(args.original), Path(args.edited)]
    images.check_output_path(out, inputs)  # before any heavy work
    for p in inputs:
        images.load_image(p)  # a clear error for an unreadable or non-image file, before loading the models
    for p in (args.face_mask, args.element_mask):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"mask file {p} not found")
    pairs = _pairs(args.pairs)
    # Landmark face masks (the default) need the face models: load them before the diffusion models, so a
    # missing model pack is reported at once.
    use_landmarks = args.multi_face or (args.face_mask is None and args.mask_source == "landmarks")
    analyzer = _face_analyzer(args) if use_landmarks else None
    sd = _load(args)
    method = EditedID(sd, _method_config(args))
    if args.multi_face:
        result = restore_faces(method, args.original, args.edited, analyzer, args.prompt_original,
                               args.prompt_edited, args.id_words, args.element_words, pairs=pairs,
                               seed=args.seed, progress=True)
        written = images.save_image(result.image, out, inputs)
        for face in result.faces:
            sims = "" if face.id_sim_before is None else (f", ID-Sim {face.id_sim_before:.3f} -> "
                                                          f"{face.id_sim_after:.3f}")
            print(f"face {face.pair[0]} (original) : {face.pair[1]} (edited): reconstruction PSNR "
                  + ", ".join(f"{k} {v:.1f} dB" for k, v in face.psnr.items()) + sims)
    else:
        result = method.restore(args.original, args.edited, args.prompt_original, args.prompt_edited,
                                id_words=args.id_words, element_words=args.element_words,
                                face_mask=args.face_mask, element_mask=args.element_mask, seed=args.seed,
                                progress=True, save_intermediates=args.save_intermediates, analyzer=analyzer)
        written = images.save_restored(result, out, original=args.edited, inputs=inputs)
        print("reconstruction PSNR: " + ", ".join(f"{k} {v:.1f} dB" for k, v in result.psnr.items()))
        calls = result.unet_calls.get("disentangle", {})
        print(f"Stage 2: {result.inversion} inversion, {calls.get('forward', 0)} UNet calls "
              f"({calls.get('backward', 0)} differentiated)")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"minid restore: wrote {written}")
    return 0


def cmd_generate(args) -> int:
    from minid import images
    from minid.generate import generate

    images.check_output_path(Path(args.out), [])
    sd = _load(args)
    image = generate(sd, args.prompt, num_steps=args.steps, guidance=args.guidance, solver=args.solver,
                     seed=args.seed, size=args.size)
    print(f"minid generate: wrote {images.save_image(image, args.out)}")
    return 0


def cmd_eval(args) -> int:
    from minid.metrics import evaluate_folder

    summary = evaluate_folder(args.folder, _face_analyzer(args), out_dir=args.out, progress=True)
    print(summary.get("summary", summary))
    return 0


def _add_face_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--face-pack", default="buffalo_l", help="insightface model pack (detection, landmarks, ArcFace)")
    p.add_argument("--face-root", help="folder of insightface model packs (default ~/.insightface or "
                                       "$MINID_INSIGHTFACE_ROOT)")
    p.add_argument("--download-faces", action="store_true", help="let insightface fetch the pack if missing")


def cmd_checkpoint(argv: list[str]) -> int:
    from minid import weights

    return weights.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate a portrait, edit it (identity drifts), restore it with EditedID")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--out", default="out/demo", help="folder for the images, masks, w schedule, maps")
    p.add_argument("--prompt", default="a photo of a man")
    p.add_argument("--subject-word", default="man")
    p.add_argument("--element", default="black glasses")
    p.add_argument("--element-word", default="glasses")
    p.add_argument("--paper-settings", action="store_true",
                   help="on a CPU too: 20 generation steps and null-text inversion (hours at full size on a CPU)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("restore", help="restore the original's face identity in an edited image")
    p.add_argument("--original", required=True, help="the photo whose identity is kept")
    p.add_argument("--edited", required=True, help="the edited image whose face drifted")
    p.add_argument("--prompt-original", required=True, help='e.g. "a photo of a man"')
    p.add_argument("--prompt-edited", required=True, help='e.g. "a photo of a man wearing black glasses"')
    p.add_argument("--id-words", nargs="+", required=True, help="identity words, e.g. man face")
    p.add_argument("--element-words", nargs="*", default=[], help="edited elements, e.g. glasses")
    p.add_argument("--face-mask", help="PNG, white = face region of the original")
    p.add_argument("--element-mask", help="PNG, white = edited element region of the edited image")
    p.add_argument("--out", required=True, help="output image (never written over an input)")
    p.add_argument("--save-intermediates", metavar="DIR",
                   help="write reconstructions, masks, the w schedule and attention maps here")
    p.add_argument("--mask-source", choices=("landmarks", "attention"), default="landmarks",
                   help="face mask when --face-mask is not given: from the original's face landmarks (needs the "
                        "face models) or from the cross-attention maps of the identity words")
    p.add_argument("--multi-face", action="store_true",
                   help="restore every face: detect and pair faces in both images, restore all in one batch")
    p.add_argument("--pairs", help="with --multi-face: which faces, as original:edited indices, e.g. 0:1,2:0")
    _add_face_args(p)
    _add_model_args(p)
    _add_method_args(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("generate", help="text to image with SD1.4")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--solver", choices=("ddim", "dpm", "hybrid"), default="ddim")
    p.add_argument("--size", type=int, default=512)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="ID similarity and PSNR over a folder of (original, edited, result) triples")
    p.add_argument("folder", help="with original/, edited/ and result/ sub-folders of equally named images")
    p.add_argument("--out", help="where metrics.csv and metrics.json go (default: the folder)")
    _add_face_args(p)
    p.set_defaults(func=cmd_eval)

    for name, text in (("download", "fetch and verify the SD1.4 weights"),
                       ("convert", "convert a pickle checkpoint to .safetensors"),
                       ("keymap", "print the hub -> single-file key map")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("download", "convert", "keymap"):
        return cmd_checkpoint(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as e:
        print(f"minid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
