"""Dataset calibration (paper: Conclusion; A.17): rows per minute of `minid.calibrate`, local engine
vs ray.

One manifest of `--rows` pairs on the tiny random model of the tests (tests/tiny_models.py, 64²
images), written as a hub folder, so that both engines load the same weights from disk. Each repeat
runs the whole job into a fresh folder; the time is the `calibrate` call's wall time: the scan,
loading the model (in each Ray actor) and every batch. The Ray instance is started once before the
timings (`ray.init(num_cpus=2)`), as a cluster would be running already; its actors start inside
each timed job. The table has medians.

    python bench/calibrate.py        # writes bench/results/calibrate_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402
from tiny_models import IMAGE_SIZE, build_tiny_sd, random_image, tiny_configs  # noqa: E402
from unet_forward import cpu_model  # noqa: E402  (bench/ is the script's own folder)

P_O, P_E = "a photo of a man", "a photo of a man wearing glasses"


def write_hub(root: Path) -> Path:
    """The tiny stack as a hub folder (config.json + safetensors per component), as
    tests/conftest.py does."""
    from safetensors.torch import save_file

    sd = build_tiny_sd()
    unet_cfg = dataclasses.asdict(sd.unet.cfg)
    unet_cfg["attention_head_dim"] = unet_cfg.pop("num_heads")  # the published config's name for it
    parts = {
        "unet": (sd.unet, unet_cfg, "diffusion_pytorch_model.safetensors"),
        "vae": (sd.vae, dataclasses.asdict(sd.vae.cfg), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (
            sd.text_encoder,
            dataclasses.asdict(sd.text_encoder.cfg),
            "model.safetensors",
        ),
    }
    for name, (model, config, file) in parts.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / name / file)
        )
    return root


def write_manifest(folder: Path, rows: int) -> Path:
    from minid.imaging.images import tensor_to_pil

    (folder / "images").mkdir(parents=True)
    lines = ["original,edited,prompt_original,prompt_edited,id_words,element_words"]
    for i in range(rows):
        tensor_to_pil(random_image(2 * i)).save(folder / "images" / f"o{i}.png")
        tensor_to_pil(random_image(2 * i + 1)).save(folder / "images" / f"e{i}.png")
        lines.append(f"images/o{i}.png,images/e{i}.png,{P_O},{P_E},man,glasses")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def time_job(manifest: Path, hub: Path, config, work: Path) -> tuple[float, bytes]:
    from minid.dataset.job import calibrate

    out = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    result = calibrate(
        manifest, out, config, weights=hub, dtype=torch.float32, device="cpu", progress=False
    )
    seconds = time.perf_counter() - t0
    if result.summary["ok"] != result.summary["rows"]:
        raise RuntimeError(f"rows failed: {result.summary['errors']}")
    images = b"".join(p.read_bytes() for p in sorted((out / "results").glob("*.png")))
    shutil.rmtree(out)
    return seconds, images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2, help="K, the same for every engine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--null-inner-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibrate_cpu.md")
    args = parser.parse_args(argv)

    import ray

    from minid.dataset.job import CalibrateConfig
    from minid.restore.config import RestoreConfig
    from minid.restore.config import with_fields as _with

    restore = _with(
        RestoreConfig(),
        {
            "method.solver.num_steps": args.steps,
            "method.solver.dpm_start": min(5, args.steps),
            "method.solver.dpm_end": args.steps,
            "method.null_text.inner_steps": args.null_inner_steps,
            "image_size": IMAGE_SIZE,
        },
    )
    local = CalibrateConfig(restore=restore, batch_size=args.batch)
    work = Path(tempfile.mkdtemp(prefix="minid-bench-calibrate-"))
    try:
        hub, manifest = write_hub(work / "hub"), write_manifest(work / "data", args.rows)
        # One torch thread, as each Ray actor has (Ray sets OMP_NUM_THREADS to its one CPU): on this
        # machine's two shared cores, more threads for tiny models thrash (tests/conftest.py,
        # `one_thread`).
        torch.set_num_threads(1)
        runs = {
            "local, 1 process × 1 thread": [
                time_job(manifest, hub, local, work) for _ in range(args.repeats)
            ]
        }
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ray_config = dataclasses.replace(local, engine="ray", num_workers=2)
            runs["ray, 2 workers × 1 CPU"] = [
                time_job(manifest, hub, ray_config, work) for _ in range(args.repeats)
            ]
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = runs["local, 1 process × 1 thread"][0][1]
    lines = [
        "# minid calibrate: rows per minute, local engine vs ray (cpu)",
        "",
        f"{datetime.date.today()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"ray {ray.__version__}, {platform.machine()} ({cpu_model()}), {os.cpu_count()} cores. "
        f"Tiny random "
        f"SD stack of tests/tiny_models.py loaded from a hub folder, {IMAGE_SIZE}² images, "
        f"{args.rows} rows, batch K = "
        f"{args.batch}, {args.steps} steps, {args.null_inner_steps} null-text updates per step at "
        f"most; "
        f"median of {args.repeats} whole jobs (scan, model loading, every batch) into fresh "
        f"folders. The "
        "Ray instance runs before the timings; its actors start, and load the model, inside each "
        "job.",
        "",
        "| engine | job (s) | rows/min | runs (s) | images equal to the local run's |",
        "|---|---:|---:|---|---|",
    ]
    rates = {}
    for name, results in runs.items():
        med = statistics.median(t for t, _ in results)
        rates[name] = args.rows / med * 60
        same = "yes" if all(images == reference for _, images in results) else "no"
        lines.append(
            f"| {name} | {med:.1f} | {rates[name]:.1f} | "
            f"{', '.join(f'{t:.1f}' for t, _ in results)} "
            f"| {same} |"
        )
    local_rate, ray_rate = rates.values()
    lines += [
        "",
        f"Ray with 2 workers: {ray_rate / local_rate:.2f}× the local engine's rows per minute on "
        f"this "
        "machine, whose 2 cores other jobs share. The Ray figure includes two actors' start and "
        "model load "
        "in every job, a fixed cost that a longer job spreads thinner. Each actor runs one torch "
        "thread, as "
        "the local run here, so the images are compared byte for byte.",
    ]
    clip_cfg, unet_cfg, vae_cfg = tiny_configs()
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": 1,
        "image_size": IMAGE_SIZE,
        "prompts": {"original": P_O, "edited": P_E, "id_words": "man", "element_words": "glasses"},
        "model": {"seed": 0, "text_encoder": clip_cfg, "unet": unet_cfg, "vae": vae_cfg},
        "local": local,
        "ray": ray_config,
        "ray_init": {"num_cpus": 2},
    }
    print("\n".join(lines))
    write_results(args.out, "\n".join(lines) + "\n", config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
