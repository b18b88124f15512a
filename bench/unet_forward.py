"""UNet forward time: minid vs diffusers, full SD1.4 architecture, same random weights, fp32, CPU.

Both models are built in one process and share one set of weight tensors. For each batch size, each
model runs `--warmup` times, then `--runs` rounds time one forward of each, alternating which goes
first, under `torch.inference_mode()`. The table reports the medians and their ratio (minid /
diffusers; below 1 is faster).

    python bench/unet_forward.py [--latent 32] [--batches 1 2] [--runs 5]

Writes bench/results/unet_forward_cpu.md (with torch/diffusers versions, CPU model, threads and
date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch

from minid.models.config import UNetConfig
from minid.models.unet import UNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402

SD14_UNET_CONFIG = REPO / "tests" / "data" / "sd14" / "hub" / "unet" / "config.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@torch.no_grad()
def build_models() -> tuple[UNet, torch.nn.Module]:
    """diffusers' UNet from SD1.4's config.json with N(0, 1/fan_in) weights; minid's UNet sharing
    them."""
    config = json.loads(SD14_UNET_CONFIG.read_text()) if SD14_UNET_CONFIG.is_file() else {}
    cfg = UNetConfig.from_dict(config) if config else UNetConfig()
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=cfg.down_block_types,
            up_block_types=cfg.up_block_types,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.num_heads,
            cross_attention_dim=cfg.cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            downsample_padding=cfg.downsample_padding,
        )
        ours = UNet(cfg)
    ref = ref.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    for p in ref.parameters():
        p.normal_(generator=g).div_(p[0].numel() ** 0.5 if p.ndim > 1 else 10.0)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval(), ref


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256² pixels)")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 2], help="batch sizes to time"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed rounds per batch size (median reported)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed forwards per model before timing"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "unet_forward_cpu.md"
    )
    args = parser.parse_args()

    ours, ref = build_models()
    load_before = os.getloadavg()[0]
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            sample = torch.randn(batch, 4, args.latent, args.latent, generator=g)
            context = torch.randn(batch, 77, 768, generator=g)
            t = torch.full((batch,), 500)
            run_ours = lambda: ours(sample, t, context)  # noqa: E731
            run_ref = lambda: ref(sample, t, context).sample  # noqa: E731
            err = (run_ours() - run_ref()).abs().max().item()  # also the first warm-up
            for _ in range(args.warmup - 1):
                run_ours(), run_ref()
            times = {"minid": [], "diffusers": []}
            for r in range(args.runs):
                order = [("minid", run_ours), ("diffusers", run_ref)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    times[name].append(time_once(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                (batch, med["minid"], med["diffusers"], med["minid"] / med["diffusers"], err)
            )
            print(
                f"batch {batch}: minid {med['minid']:.3f} s, diffusers {med['diffusers']:.3f} s, "
                f"ratio {med['minid'] / med['diffusers']:.3f}, max abs diff {err:.1e}",
                flush=True,
            )

    lines = [
        f"# UNet forward, SD1.4 architecture, fp32, CPU, latent {args.latent}×{args.latent}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}; 1-minute load average"
        f" {load_before:.1f} before and {os.getloadavg()[0]:.1f} after timing (other processes add "
        f"noise)",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}",
        f"- median of {args.runs} interleaved runs after {args.warmup} warm-up runs, "
        f"`torch.inference_mode()`,"
        f" same random weights (shared tensors)",
        "",
        "| batch | minid (s) | diffusers (s) | minid / diffusers | max abs diff |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {b} | {m:.3f} | {d:.3f} | {r:.3f} | {e:.1e} |" for b, m, d, r, e in rows],
        "",
    ]
    table = "\n".join(lines)
    print(table)
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "unet": ours.cfg,
        "unet_source": str(SD14_UNET_CONFIG.relative_to(REPO))
        if SD14_UNET_CONFIG.is_file()
        else "UNetConfig()",
        "weights": "N(0, 1/fan_in) matrices and convs, N(0, 0.01) vectors, seed 0, shared",
        "inputs": {"seed": "the batch size", "context": [77, 768], "timestep": 500},
    }
    # the claim holds only when SD1.4's config.json gives minid's shipped UNetConfig()
    defaults = {"unet": "minid.models.config.UNetConfig"} if ours.cfg == UNetConfig() else {}
    write_results(args.out, table, config, defaults)


if __name__ == "__main__":
    main()
