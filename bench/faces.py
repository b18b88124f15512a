"""Several faces in one batch: the time of restoring K face patches at once vs one.

`EditedID.restore_batch` (what `restore_faces` runs after cropping the patches) restores K
(original, edited) patches in one batch through every stage: 2K latents in Stages 1-2, 3K branches ×
2 guidance halves in Stage 3. The number of UNet calls does not grow with K; each call's work does.
On a GPU a batch of 4 small patches fills the device about as fast as one, so the goal is time(4) ≤
2 × time(1); on a CPU the compute grows with the batch and time(4) is closer to 4 × time(1) less the
per-call overheads.

Model: the small random UNet/VAE/CLIP of bench/pipeline.py, on the real CLIP tokenizer. Each K runs
once as warm-up, then `--repeats` times; the table has the median.

    python bench/faces.py --device cpu            # writes bench/results/faces_cpu.md
    python bench/faces.py --device cuda --size 512 --full
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import configs, minid_stack  # noqa: E402  (the shared small random stack)
from record import write_results  # noqa: E402

P_O = "a photo of a man"
P_E = "a photo of a man wearing black glasses"


def smooth_image(seed: int, size: int) -> torch.Tensor:
    """A low-frequency random picture (1, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(size // 16, 2), max(size // 16, 2), generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def time_batch(pipe, k: int, size: int, repeats: int, sync) -> list[float]:
    from minid.restore.inputs import RestorePair

    pairs = [
        RestorePair(
            smooth_image(2 * i, size), smooth_image(2 * i + 1, size), P_O, P_E, ["man"], ["glasses"]
        )
        for i in range(k)
    ]
    pipe.restore_batch(pairs, progress=False)  # warm-up: every batch shape seen once
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        pipe.restore_batch(pairs, progress=False)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--full", action="store_true", help="SD1.4's architecture (random weights), fp16 on CUDA"
    )
    parser.add_argument("--size", type=int, default=128, help="side of each face patch in pixels")
    parser.add_argument(
        "--faces", type=int, nargs="+", default=[1, 4], help="batch sizes K to time"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--null-inner-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from minid.method.editedid import EditedIDConfig
    from minid.method.null_text import NullTextConfig
    from minid.restore.config import RestoreConfig
    from minid.restore.pipeline import EditedID
    from minid.sampling.hybrid import HybridSchedule

    device = torch.device(args.device)
    sd, _ = minid_stack(args.full)
    dtype = torch.float16 if (args.full and device.type == "cuda") else torch.float32
    for name in ("text_encoder", "unet", "vae"):
        getattr(sd, name).to(device, dtype).requires_grad_(False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    method = EditedIDConfig(
        solver=HybridSchedule(
            num_steps=args.steps, dpm_start=min(5, args.steps), dpm_end=args.steps
        ),
        # no early
        null_text=NullTextConfig(
            inner_steps=args.null_inner_steps, epsilon=0.0, epsilon_growth=0.0
        ),
    )
    # stop: every K does the same work
    restore = RestoreConfig(method, image_size=args.size)
    pipe = EditedID(sd, restore)
    rows = []
    for k in args.faces:
        times = time_batch(pipe, k, args.size, args.repeats, sync)
        rows.append((k, statistics.median(times), times))
        print(
            f"K={k}: median {statistics.median(times):.2f} s  "
            f"({', '.join(f'{t:.2f}' for t in times)})"
        )
    base = rows[0][1]
    model = "SD1.4 architecture" if args.full else "small UNet (64-128-128-128, 1 layer per block)"
    lines = [
        f"# EditedID, K faces in one batch vs one ({args.device})",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads; {model} with random weights, {args.size}² "
        f"patches, "
        f"{args.steps} steps, {args.null_inner_steps} null-text updates per step (no early stop), "
        f"median of {args.repeats} runs after a warm-up, `EditedID.restore_batch`.",
        "",
        "| faces K | time (s) | time / time(K=1) | per face (s) |",
        "|---:|---:|---:|---:|",
    ]
    for k, med, _ in rows:
        lines.append(f"| {k} | {med:.2f} | {med / base:.2f} | {med / k:.2f} |")
    k_last, t_last, _ = rows[-1]
    verdict = "holds" if t_last <= 2 * base else "does not hold"
    lines += [
        "",
        f"Goal time({k_last}) ≤ 2 × time(1): {verdict} here ({t_last / base:.2f}×). "
        "The UNet is called as many times for every K; on a CPU each call's compute grows with the "
        "batch, "
        "on a GPU a batch of small patches runs in about the time of one.",
    ]
    out = args.out or REPO / "bench" / "results" / f"faces_{args.device}.md"
    clip_cfg, unet_cfg, vae_cfg, _ = configs(args.full)
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "model": {
            "weights": "random (bench/pipeline.py randomize_, seeds 1 / 2 / 3)",
            "text_encoder": clip_cfg,
            "unet": unet_cfg,
            "vae": vae_cfg,
        },
        "restore": restore,
        "prompts": {
            "original": P_O,
            "edited": P_E,
            "id_words": ["man"],
            "element_words": ["glasses"],
        },
        "inputs": "smooth_image(2i) / smooth_image(2i + 1) per face i, size/16 noise upsampled",
        "warmup_runs": 1,
    }
    print("\n".join(lines))
    write_results(out, "\n".join(lines) + "\n", config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
