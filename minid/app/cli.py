"""The `minid` command: demo, restore, calibrate, validate, generate, eval, download, convert,
keymap.

Each sub-command is a thin layer over a library function; the heavy imports happen inside the
command, so `minid --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from minid.app import options
from minid.app.options import Parser, method_config


def _device_and_dtype(device: str | None, dtype: str | None):
    """(device, torch dtype) of --device and --dtype, checked before anything loads (a ValueError
    naming the flag for a device PyTorch does not know or this machine lacks)."""
    import torch

    from minid.loading.checkpoint import check_device_dtype

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        # fp16 halves memory and time on a GPU; CPUs run fp32 far better than fp16.
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    dev, dtype = check_device_dtype(device, dtype, what=("--device", "--dtype"))
    return str(dev), dtype


def _load(args):
    """Load SD1.4 from --weights, or from weights/sd-v1-4, downloaded and verified first when
    needed."""
    from minid.loading import checkpoint
    from minid.loading import download as weights

    device, dtype = _device_and_dtype(args.device, args.dtype)
    if args.weights is None:
        source = checkpoint.DEFAULT_WEIGHTS
        # Verifies what is there (no network needed when every file is present) and fetches what is
        # not.
        weights.download(source, precision="fp32" if dtype == _torch().float32 else "fp16")
    else:
        source = Path(args.weights)
    print(
        f"minid: loading {source} as {str(dtype).removeprefix('torch.')} on {device}",
        file=sys.stderr,
    )
    return checkpoint.load_stable_diffusion(source, dtype=dtype, device=device)


def _torch():
    import torch

    return torch


def _tokenizer(args):
    """The tokenizer of --weights (cheap: no model), to check prompts and words before anything
    loads."""
    from minid.loading import checkpoint

    return checkpoint.load_tokenizer(
        args.weights if args.weights is not None else checkpoint.DEFAULT_WEIGHTS
    )


def _check_word(tokenizer, prompt: str, word: str, flags: str) -> None:
    """`word` in `prompt` within the 75 tokens the text encoder reads, or a ValueError naming the
    flags."""
    from minid.models.tokenizer import shortened

    try:
        found = tokenizer.token_positions(prompt, word)
    except ValueError as e:
        raise ValueError(f"{flags}: {e}") from None
    if not found:
        raise ValueError(
            f"{flags}: {word!r} lies beyond the first {tokenizer.max_content_tokens} tokens of "
            f"{shortened(prompt)!r}, which are all SD1.4's text encoder reads"
        )


def _prompt_notes(tokenizer, prompts: dict[str, str]) -> list[str]:
    """{flag: prompt} → a ValueError naming the flag for a prompt that is not text; the notes of
    prompts longer than the text encoder reads (to print once every check has passed)."""
    from minid.models.tokenizer import prompt_note

    return [
        note for flag, prompt in prompts.items() if (note := prompt_note(tokenizer, prompt, flag))
    ]


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_demo(args) -> int:
    from minid.app.demo import (
        DEMO_FILES,
        PAPER_GENERATE_STEPS,
        demo_settings,
        demo_unet_images,
        seconds_per_unet_image,
    )
    from minid.restore import report

    # every check before anything loads: device, the output folder, the prompt and words, the
    # numbers
    device, dtype = _device_and_dtype(args.device, args.dtype)
    report.check_result_folder(args.out, overwrite=args.overwrite, what="--out", names=DEMO_FILES)
    tokenizer = _tokenizer(args)
    prompt_edited = f"{args.prompt} wearing {args.element}"
    notes = _prompt_notes(
        tokenizer, {"--prompt and --element ('PROMPT wearing ELEMENT')": prompt_edited}
    )
    _check_word(tokenizer, args.prompt, args.subject_word, "--subject-word")
    _check_word(tokenizer, prompt_edited, args.element_word, "--element-word")
    config = method_config(args)
    if args.tiny:
        _check_tiny(args, config)
    _print_notes(notes)
    if args.tiny:
        from minid.loading.tiny import IMAGE_SIZE, build_tiny_sd

        print(
            f"minid demo --tiny: a tiny SD stack with random weights, {IMAGE_SIZE}² images: "
            "every stage runs, and its pictures are noise because the weights are random",
            file=sys.stderr,
        )
        sd = build_tiny_sd(args.seed)
        for model in (sd.text_encoder, sd.unet, sd.vae):
            model.to(device, dtype)
        args.image_size = IMAGE_SIZE
        return _run_demo(args, sd, config, PAPER_GENERATE_STEPS, config.method)
    sd = _load(args)
    steps, method = demo_settings(device, config.method, args.paper_settings)
    per_image = seconds_per_unet_image(sd, args.image_size)
    paper = sum(demo_unet_images(*demo_settings(device, config.method, True)).values()) * per_image
    chosen = sum(demo_unet_images(steps, method).values()) * per_image
    print(
        f"minid demo: one image through the UNet takes {per_image:.2f} s here; the paper's "
        f"settings would take "
        f"about {paper / 60:.0f} min",
        file=sys.stderr,
    )
    if method is not config.method:
        print(
            f"minid demo: on this CPU it runs {steps} generation steps and direct inversion "
            f"instead, about "
            f"{chosen / 60:.0f} min (--paper-settings runs the paper's)",
            file=sys.stderr,
        )
    return _run_demo(args, sd, config, steps, method)


def _check_tiny(args, config) -> None:
    """--tiny with what it replaces: a ValueError naming the flag, before anything runs."""
    from minid.restore.config import RestoreConfig

    if args.weights is not None:
        raise ValueError(
            f"--tiny runs random tiny models, not --weights {args.weights}: drop one of the two"
        )
    if config.image_size != RestoreConfig().image_size:
        raise ValueError(
            f"--tiny runs at the tiny models' 64² images, not --image-size {config.image_size}: "
            "drop --image-size"
        )


def _run_demo(args, sd, config, steps: int, method) -> int:
    """The demo with `steps` generation steps and `method`, and the list of what it wrote."""
    from minid.app.demo import demo

    paths = demo(
        sd,
        args.out,
        prompt=args.prompt,
        subject_word=args.subject_word,
        element=args.element,
        element_word=args.element_word,
        seed=args.seed,
        size=args.image_size,
        generate_steps=steps,
        config=dataclasses.replace(config, method=method),
        overwrite=args.overwrite,
    )
    print("minid demo: wrote")
    for name, path in paths.items():
        print(f"  {name:24s} {path}")
    return 0


def _face_analyzer(args):
    from minid.faces.analyzer import FaceAnalyzer, FaceAnalyzerConfig

    if getattr(args, "face_backend", "insightface") == "dlib":
        return _dlib_face_analyzer(args)
    config = FaceAnalyzerConfig(max_faces=getattr(args, "max_faces", FaceAnalyzerConfig.max_faces))
    try:
        return FaceAnalyzer.from_pack(
            args.face_pack, root=args.face_root, config=config, download=args.download_faces
        )
    except (ImportError, FileNotFoundError) as e:
        hint = _without_face_models(args)
        if not hint:
            raise
        raise type(e)(f"{e}; {hint}") from None


def _without_face_models(args) -> str:
    """What this command line can do without the face models, in its own flags ("" when
    nothing)."""
    if args.command != "restore":
        return ""
    flags = {"--multi-face": "multi_face", "--regions": "regions"}
    needs = [flag for flag, name in flags.items() if getattr(args, name, None)]
    if needs:  # they find the faces with the face models: a mask does not replace them
        return f"{' and '.join(needs)} find the faces with them, so they are needed"
    return "or restore without the face models: --face-mask FILE or --mask-source attention"


def _dlib_face_analyzer(args):
    """--face-backend dlib: boxes and keypoints from dlib. Its 128-d descriptor is not ArcFace,
    so it is not computed here: the commands would report it as ID-Sim (a cosine of ArcFace
    embeddings), which it is not; `minid eval`, which measures only ID-Sim, refuses it."""
    from minid.faces.dlib_backend import DlibFaceAnalyzer

    if args.command == "eval":
        raise ValueError(
            "--face-backend dlib: minid eval measures ID-Sim, the cosine of ArcFace embeddings, "
            "which dlib does not have; use --face-backend insightface"
        )
    try:
        return DlibFaceAnalyzer(embeddings=False)
    except (ImportError, FileNotFoundError) as e:
        hint = _without_face_models(args)
        if not hint:
            raise
        raise type(e)(f"{e}; {hint}") from None


def _pairs(text: str | None):
    """ "0:1,2:0" -> [(0, 1), (2, 0)]: (face index in the original, face index in the edited
    image)."""
    if text is None:
        return None
    try:
        return [tuple(int(i) for i in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--pairs must look like 0:1,2:0 (original face : edited face), got {text!r}"
        ) from None


# what a restore needs besides its pictures before the models load (the interpreter, torch): the
# memory check refuses only what cannot fit even so; the models' own memory comes on top (SD1.4:
# about 4.3 GB in fp32 on a CPU)
MEMORY_MARGIN = 2**30


def cmd_restore(args) -> int:
    from minid.imaging import images
    from minid.models.tokenizer import prompt_note
    from minid.restore import report
    from minid.loading.files import check_memory
    from minid.restore import registration
    from minid.restore.inputs import RestorePair, check_pair, check_settings, check_text
    from minid.restore.multiface import FacePatchConfig, plan_faces, restore_planned
    from minid.restore.pipeline import EditedID

    out = Path(args.out)
    # IdGlow's mask-free mode: identity through the tokens only
    mask_free = args.face_mask == "none"
    face_mask = None if mask_free else args.face_mask
    # Every check before any heavy work: device; outputs (never over an input, masks included; an
    # existing file only with --overwrite; writable folders); then prompts, words, images and masks
    # as the run will check them (check_pair), and the numbers (argparse and _method_config).
    _device_and_dtype(args.device, args.dtype)
    inputs = [
        Path(p) for p in (args.original, args.edited, face_mask, args.element_mask) if p is not None
    ]
    images.check_output_path(out, inputs, overwrite=args.overwrite, what="--out")
    if args.save_intermediates is not None:
        if (
            out.parent.resolve() == Path(args.save_intermediates).resolve()
            and out.name in report.RESULT_FILES
        ):
            raise ValueError(
                f"--out {out} is a file --save-intermediates writes too; choose another name"
            )
        report.check_result_folder(args.save_intermediates, inputs, overwrite=args.overwrite)
    for flag, p in (("--face-mask", face_mask), ("--element-mask", args.element_mask)):
        if p is not None and Path(p).is_dir():
            raise IsADirectoryError(
                f"{flag} {p} is a folder; give the mask image (PNG, white = region)"
            )
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{flag} {p}: file not found")
    if mask_free and args.regions:
        raise ValueError(
            "--face-mask none (no spatial mask) and --regions (region masks) exclude each other"
        )
    config = method_config(args)
    if mask_free:
        config = dataclasses.replace(
            config, method=dataclasses.replace(config.method, mask_free=True)
        )
    tokenizer = _tokenizer(args)
    notes = _prompt_notes(
        tokenizer,
        {"--prompt-original": args.prompt_original, "--prompt-edited": args.prompt_edited},
    )
    pair = RestorePair(
        args.original,
        args.edited,
        args.prompt_original,
        args.prompt_edited,
        args.id_words,
        args.element_words,
        face_mask,
        args.element_mask,
        seed=args.seed,
        regions=args.regions or None,
    )
    # Landmark face masks (the default), regions and --multi-face find the faces with the face
    # models: the face-patch path (registration, a patch around each face). A given mask, or the
    # attention maps, keep the centre crops.
    patch_path = (
        args.multi_face
        or bool(args.regions)
        or (face_mask is None and not mask_free and args.mask_source == "landmarks")
    )
    # headers only: cheap
    sizes = [images.check_image_file(p) for p in (args.original, args.edited)]
    if not args.no_memory_check:
        listed = " and ".join(
            f"{flag} {p} ({w}×{h})"
            for flag, p, (w, h) in zip(
                ("--original", "--edited"), (args.original, args.edited), sizes
            )
        )
        check_memory(
            images.picture_memory(sizes) + MEMORY_MARGIN,
            f"holding {listed} in 8 bits",
            "--no-memory-check",
        )
    if patch_path:  # the pictures are read once, by plan_faces
        checked_notes = check_text(pair, tokenizer, config)[1]
        check_settings(pair)
        if pair.regions is not None:
            from minid.faces.regions import parse_regions

            parse_regions(pair.regions)
    else:
        pending = check_pair(pair, tokenizer, config)
        checked_notes = list(pending.notes)  # the run appends its own notes to the pair's
    # the checks' notes, said now (before the long run, and not again after it), prompt notes in
    # the flags' words
    said = {
        prompt_note(tokenizer, p, what)
        for p, what in (
            (args.prompt_original, "prompt_original"),
            (args.prompt_edited, "prompt_edited"),
        )
    }
    _print_notes(notes + [note for note in checked_notes if note not in said])
    pairs = _pairs(args.pairs)
    if patch_path:
        # the face models before the diffusion models, so a missing pack is reported at once, and
        # the faces found and registered before SD loads
        analyzer = _face_analyzer(args)
        patches = FacePatchConfig(
            max_residual=None if args.no_registration_check else registration.MAX_RESIDUAL
        )
        plan = plan_faces(
            args.original,
            args.edited,
            analyzer,
            config,
            tokenizer,
            args.prompt_original,
            args.prompt_edited,
            args.id_words,
            args.element_words,
            pairs=pairs,
            faces="all" if args.multi_face else "main",
            patches=patches,
            element_masks=args.element_mask,
            regions=pair.regions,
            seed=args.seed,
        )
        planned = plan.notes + [n for job in plan.jobs for n in job.notes]
        fresh = list(dict.fromkeys(n for n in planned if n not in said and n not in checked_notes))
        _print_notes(fresh)
        checked_notes += planned
    sd = _load(args)
    method = EditedID(sd, config)
    if patch_path:
        faces_result = restore_planned(
            method,
            plan,
            analyzer,
            progress=True,
            save_intermediates=args.save_intermediates,
            overwrite=args.overwrite,
            patches=patches,
        )
        written = images.save_image(faces_result.image, out, inputs, overwrite=args.overwrite)
        for face in faces_result.faces:
            sims = (
                ""
                if face.id_sim_before is None
                else (f", ID-Sim {face.id_sim_before:.3f} -> {face.id_sim_after:.3f}")
            )
            print(
                f"face {face.pair[0]} (original) : {face.pair[1]} (edited): reconstruction PSNR "
                + ", ".join(f"{k} {v:.1f} dB" for k, v in face.psnr.items())
                + sims
            )
        results = [face.result for face in faces_result.faces]
        run_notes = faces_result.notes + [n for r in results for n in r.notes]
    else:
        result = method.restore_checked(
            pending,
            progress=True,
            save_intermediates=args.save_intermediates,
            analyzer=None,
            name=f"the original image {args.original}",
            overwrite=args.overwrite,
        )
        written = images.save_restored(
            result, out, frame=pending.frames[1], inputs=inputs, overwrite=args.overwrite
        )
        print(
            "reconstruction PSNR: " + ", ".join(f"{k} {v:.1f} dB" for k, v in result.psnr.items())
        )
        crop_note = (
            "no face models (a face mask given, or --mask-source attention): the two images were "
            "centre-cropped, not registered; a face the edit moved or rescaled ghosts"
        )
        results, run_notes = [result], [*result.notes, crop_note]
    for result in results:
        for region, scores in result.regions.items():
            print(
                f"region {region}: PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.3f} (result "
                f"vs {scores.get('against', 'original')})"
            )
    calls = results[0].unet_calls.get("disentangle", {})
    print(
        f"Stage 2: {results[0].inversion} inversion, {calls.get('forward', 0)} UNet calls "
        f"({calls.get('backward', 0)} differentiated)"
    )
    for note in dict.fromkeys(run_notes):
        if note not in checked_notes:  # the notes of the checks were said before the run
            print(f"note: {note}", file=sys.stderr)
    print(f"minid restore: wrote {written}")
    return 0


def cmd_calibrate(args) -> int:
    from minid.dataset.job import CalibrateConfig, calibrate, require_ray
    from minid.dataset.manifest import read_manifest
    from minid.dataset.report import format_summary
    from minid.loading import checkpoint
    from minid.loading import download as weights

    manifest = read_manifest(args.manifest)  # a manifest error before anything loads
    if getattr(args, "face_backend", "insightface") != "insightface":
        print(
            "minid calibrate: error: --face-backend dlib is not supported by calibrate (its "
            "ID-Sim is ArcFace's); use --face-backend insightface",
            file=sys.stderr,
        )
        return 2
    try:
        if args.engine == "ray":
            require_ray()
    except ImportError as e:
        print(f"minid calibrate: error: {e}", file=sys.stderr)
        return 2
    if args.engine == "local":
        device, dtype = _device_and_dtype(args.device, args.dtype)
        gpus = args.gpus_per_worker or 0.0
    else:  # the workers' device: the driver may have no GPU
        gpus = args.gpus_per_worker
        if gpus is None:
            cuda = args.device.startswith("cuda") if args.device else _torch().cuda.is_available()
            gpus = 1.0 if cuda else 0.0
        device = args.device or ("cuda" if gpus > 0 else "cpu")
        dtype = _device_and_dtype(
            "cpu", args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
        )[1]
    # as _load: verify (or fetch) weights/sd-v1-4 once, then every worker reads it
    if args.weights is None:
        weights.download(
            checkpoint.DEFAULT_WEIGHTS, precision="fp32" if dtype == _torch().float32 else "fp16"
        )
        args.weights = str(checkpoint.DEFAULT_WEIGHTS)
    # the face models for landmark face masks (only rows without a face_mask need one) and ID-Sim
    landmarks = args.mask_source == "landmarks" and any(r.face_mask is None for r in manifest.rows)
    measure = landmarks or args.id_sim
    config = CalibrateConfig(
        restore=method_config(args),
        batch_size=args.batch,
        seed=args.seed,
        mask_source=args.mask_source,
        face_pack=args.face_pack if measure else None,
        face_root=args.face_root,
        download_faces=args.download_faces,
        save_intermediates=args.save_intermediates,
        engine=args.engine,
        ray_address=args.ray_address,
        num_workers=args.num_workers,
        gpus_per_worker=gpus,
        threads=args.threads,
    )
    result = calibrate(
        manifest,
        args.out,
        config,
        weights=args.weights,
        dtype=dtype,
        device=device,
        sd=(lambda: _load(args)) if args.engine == "local" else None,
    )
    print(format_summary(result.summary))
    print("minid calibrate: wrote " + ", ".join(str(p) for p in result.paths.values()))
    return 0


def cmd_validate(args) -> int:
    from minid.app.validate import (
        VALIDATE_FILES,
        find_pairs,
        folder_notes,
        format_table,
        read_pairs,
        validate_pairs,
        write_report,
    )
    from minid.imaging import images
    from minid.restore import report
    from minid.restore.pipeline import EditedID

    # Every check before any model loads: device; the pairs folder's layout and images; the output
    # folder (never over an input; an existing file only with --overwrite); the numbers; prompts,
    # words and images as the restore will check them (check_pair, in read_pairs).
    _device_and_dtype(args.device, args.dtype)
    found, missing = find_pairs(args.pairs)
    inputs = [path for _, paths in found for path in paths.values()]
    for path in inputs:
        images.check_image_file(path)
    out = args.out if args.out is not None else args.pairs
    report.check_result_folder(
        out, inputs, overwrite=args.overwrite, what="--out", names=VALIDATE_FILES
    )
    config = method_config(args)
    tokenizer = _tokenizer(args)
    words = dict(
        prompt_original=args.prompt_original,
        prompt_edited=args.prompt_edited,
        id_words=args.id_words,
        element_words=args.element_words,
        seed=args.seed,
    )
    notes = _prompt_notes(
        tokenizer,
        {"--prompt-original": args.prompt_original, "--prompt-edited": args.prompt_edited},
    )
    read_pairs(args.pairs, tokenizer, config, **words)
    analyzer, missing_pack = None, []
    # the face models: landmark face masks and ID-Sim; without them, neither (one note), not an
    # error
    try:
        analyzer = _face_analyzer(args)
    except (ImportError, OSError) as e:
        masks = (
            "face masks from the cross-attention maps, " if args.mask_source == "landmarks" else ""
        )
        missing_pack = [f"no face models, so {masks}no ID-Sim: {e}"]
    _print_notes(notes + missing_pack + folder_notes(missing, args.element_words))
    sd = _load(args)
    rows, summary = validate_pairs(
        EditedID(sd, config),
        args.pairs,
        **words,
        analyzer=analyzer,
        mask_source=args.mask_source,
        min_psnr=args.min_psnr,
        notes=missing_pack,
    )
    paths = write_report(rows, summary, out, inputs)
    print(format_table(rows, args.min_psnr))
    print(
        f"minid validate: {summary['passing']} of {summary['pairs']} pairs reconstruct at ≥ "
        f"{args.min_psnr:g} dB "
        "(both images, after Stage 2)"
    )
    print("minid validate: wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_generate(args) -> int:
    from minid.imaging import images
    from minid.sampling.text_to_image import check_generate, generate

    _device_and_dtype(args.device, args.dtype)  # every check before anything loads
    flags = ("--steps", "--guidance", "--solver", "--size")
    check_generate(args.steps, args.guidance, args.solver, args.size, flags)
    images.check_output_path(Path(args.out), [], overwrite=args.overwrite, what="--out")
    _print_notes(_prompt_notes(_tokenizer(args), {"--prompt": args.prompt}))
    sd = _load(args)
    image = generate(
        sd,
        args.prompt,
        num_steps=args.steps,
        guidance=args.guidance,
        solver=args.solver,
        seed=args.seed,
        size=args.size,
        progress=True,
    )
    print(f"minid generate: wrote {images.save_image(image, args.out, overwrite=args.overwrite)}")
    return 0


def cmd_eval(args) -> int:
    from minid.app.evaluate import evaluate_folder, find_triples, format_summary
    from minid.imaging import images
    from minid.restore import report

    # the folder's layout and its images, before the face models load
    triples, _ = find_triples(args.folder)
    for _, paths in triples:
        for path in paths.values():
            images.check_image_file(path)
    out = args.out if args.out is not None else args.folder
    report.check_result_folder(
        out, overwrite=args.overwrite, what="--out", names=("metrics.csv", "metrics.json")
    )
    summary = evaluate_folder(args.folder, _face_analyzer(args), out_dir=args.out, progress=True)
    print(format_summary(summary))
    if summary.get("missing"):
        print(f"note: skipped {'; '.join(map(str, summary['missing']))}", file=sys.stderr)
    written = ", ".join(str(Path(out) / name) for name in ("metrics.csv", "metrics.json"))
    print(f"minid eval: wrote {written}")
    return 0


def cmd_profile(args) -> int:
    from minid.app.profile import run

    return run(args)


def cmd_download(args) -> int:
    from minid.loading.download import default_precision, download

    download(args.dest, args.precision or default_precision(), args.repo, args.revision)
    return 0


def cmd_convert(args) -> int:
    from minid.loading.download import convert

    convert(args.src, args.dst, args.overwrite)
    return 0


def cmd_keymap(args) -> int:
    from minid.loading.keymap import format_key_map

    print(format_key_map())
    return 0


def cmd_manifest(args) -> int:
    import json

    from minid.loading.download import build_manifest

    print(json.dumps(build_manifest(args.layouts, args.hub_folder), indent=2))
    return 0


# the sub-commands with options: name, help, the options (options.py), what runs
COMMANDS = (
    (
        "demo",
        "generate a portrait, edit it (identity drifts), restore it with EditedID",
        options.add_demo_args,
        cmd_demo,
    ),
    (
        "restore",
        "restore the original's face identity in an edited image",
        options.add_restore_args,
        cmd_restore,
    ),
    (
        "calibrate",
        "restore every pair of a dataset manifest (CSV or JSON Lines); resumable",
        options.add_calibrate_args,
        cmd_calibrate,
    ),
    (
        "validate",
        "check the weights on (original, edited) pairs: Stage 2's reconstruction PSNR against 25 "
        "dB, "
        "the w schedule, Table 11's metrics, ID-Sim",
        options.add_validate_args,
        cmd_validate,
    ),
    ("generate", "text to image with SD1.4", options.add_generate_args, cmd_generate),
    (
        "eval",
        "ID similarity and PSNR over a folder of (original, edited, result) triples",
        options.add_eval_args,
        cmd_eval,
    ),
    (
        "profile",
        "one UNet step under torch.profiler: time, FLOP and bytes per attention site and kernel",
        options.add_profile_args,
        cmd_profile,
    ),
    ("download", "fetch and verify the SD1.4 weights", options.add_download_args, cmd_download),
    (
        "convert",
        "convert a pickle checkpoint to .safetensors",
        options.add_convert_args,
        cmd_convert,
    ),
    ("keymap", "print the hub -> single-file key map", options.add_keymap_args, cmd_keymap),
    (
        "manifest",
        "print the weights manifest from layouts.json and the hub's small files (maintainers)",
        options.add_manifest_args,
        cmd_manifest,
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `command`, the options of that one only (the others keep
    their names and help), so a command imports no more of minid than it runs: `minid generate` no
    method."""
    from minid import __version__

    parser = Parser(prog="minid", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"minid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    known = {name for name, *_ in COMMANDS}
    for name, text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=text)
        if command not in known or name == command:
            add_args(p)
        p.set_defaults(func=run)
    return parser


class _Terminated(Exception):
    """SIGTERM (`kill`, a job scheduler's stop), raised in the main thread as Ctrl-C is."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user's error is one line on stderr and exit code 2, Ctrl-C one line and
    130, SIGTERM one line and 143."""
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "minid"
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            # the library warns Python users of a resized mask; here the same words come once, as a
            # note
            warnings.filterwarnings("ignore", message=r"mask .* resized to", category=UserWarning)
            parser = build_parser(argv[0] if argv else None)
            args, extra = parser.parse_known_args(argv)
            if extra:  # a mistyped flag of a sub-command: that command's usage, not minid's
                parser._subparsers._group_actions[0].choices[args.command].error(
                    f"unrecognized arguments: {' '.join(extra)}"
                )
            return args.func(args)
    # argparse's errors (already printed, one line): the code, for callers in Python too
    except SystemExit as e:
        if not e.code:
            raise  # --help
        return e.code
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written is left behind
        print(f"\nminid {command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"\nminid {command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except (ValueError, OSError, ImportError, MemoryError) as e:
        # ValueError: bad inputs and settings; OSError: files, folders, the network; ImportError: a
        # missing extra; MemoryError: a run that cannot fit (checked before it starts)
        # an OSError minid words itself (errno, message) reads without its "[Errno N]" prefix
        words = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e
        print(f"minid {command}: error: {words}", file=sys.stderr)
        return 2
    finally:
        if main_thread:  # None: a handler not set from Python, given back as the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


if __name__ == "__main__":
    sys.exit(main())
