"""The whole EditedID restore: per-stage time and peak memory, minid vs a straightforward diffusers
version.

Both sides run the same algorithm with the same loops (`minid.method.editedid.EditedID`: the solver
math, the null-text optimisation, the masks, the blending are shared code) on the same random
weights; what differs is the model stack and the attention:
- minid: minid's CLIP, UNet and VAE; attention through the seam, edits with the fused ops of
  `minid.models.attention` (chunked PyTorch on CPU, Triton on CUDA), which never write a
  self-attention map.
- reference: transformers' CLIPTextModel, diffusers' UNet2DConditionModel and AutoencoderKL holding
  the same state dicts, with attention processors that compute every attention map P = softmax(q
  kᵀ/√d) in memory and edit P itself (rows of T's self-attention map mixed from O/E/T, token columns
  copied between maps) before P V, the way prompt-to-prompt and the authors' released code work.

Each implementation runs in its own subprocess (so one's allocations do not hide the other's), once,
after one warm-up restore (every batch shape seen once). Memory: on CUDA the peak allocated by
PyTorch within each stage (`max_memory_allocated` after a reset at the stage's start); on CPU the
peak resident set size during the stage minus the one at its start, sampled every 2 ms.

    python bench/pipeline.py --device cpu              # small model, 256², writes
                                                       bench/results/pipeline_cpu.md
    python bench/pipeline.py --device cuda --full      # SD1.4 architecture, 512², 6 steps, fp16
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SD14_HUB = REPO / "tests" / "data" / "sd14" / "hub"  # SD1.4's published configs
INVERSION_REPEATS = 3  # restores per Stage 2 choice; the table shows the median run
P_O = "a photo of a man"
P_E = "a photo of a man wearing black glasses"
INVERSIONS = ("null-text", "direct", "negative-prompt")  # Stage 2's three ways

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402


# ---- model stacks with shared random weights -----------------------------------------------------


def configs(full: bool):
    from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig

    if full:
        return (
            CLIPTextConfig.from_dict(
                json.loads((SD14_HUB / "text_encoder" / "config.json").read_text())
            ),
            UNetConfig.from_dict(json.loads((SD14_HUB / "unet" / "config.json").read_text())),
            VAEConfig.from_dict(json.loads((SD14_HUB / "vae" / "config.json").read_text())),
            512,
        )
    clip = CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    unet = UNetConfig(
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=1,
        num_heads=4,
        cross_attention_dim=64,
        norm_num_groups=16,
        sample_size=32,
    )
    vae = VAEConfig(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=256
    )
    return clip, unet, vae, 256


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 1/fan_in) matrices, norm scales near 1, small biases: activations of order one through
    the net."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g))
        if p.ndim == 1:
            p.mul_(0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            p.div_(p[0].numel() ** 0.5)
    return model


def minid_stack(full: bool):
    from minid.loading.checkpoint import StableDiffusion
    from minid.models.clip import CLIPTextModel
    from minid.models.tokenizer import CLIPTokenizer
    from minid.models.unet import UNet
    from minid.models.vae import VAE

    clip_cfg, unet_cfg, vae_cfg, size = configs(full)
    return StableDiffusion(
        tokenizer=CLIPTokenizer.default(),
        text_encoder=randomize_(CLIPTextModel(clip_cfg), 1).eval(),
        unet=randomize_(UNet(unet_cfg), 2).eval(),
        vae=randomize_(VAE(vae_cfg), 3).eval(),
    ), size


class _RefText(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


class _RefVAE(torch.nn.Module):
    def __init__(self, model, scaling_factor):
        super().__init__()
        self.model = model
        self.scaling_factor = scaling_factor

    def encode_latent(self, x, sample=False, generator=None):
        return self.scaling_factor * self.model.encode(x).latent_dist.mean

    def decode_latent(self, latent):
        return self.model.decode(latent / self.scaling_factor).sample


def naive_attention(q, k, v, site, controller):
    """Attention with the map in memory, and every edit made on the map (the reference's way)."""
    from minid.method.control import AttentionStore
    from minid.method.gating import EditedIDGating, GatingGroup

    step = 0
    # `control.at_step`: the controller and the step it is at
    if isinstance(controller, functools.partial):
        controller, step = controller.func, controller.keywords["step"]
    if isinstance(controller, GatingGroup) and len(controller.gatings) == 1:
        controller = controller.gatings[0]

    scale = 1.0 / math.sqrt(q.shape[-1])
    # (B, h, Nq, Nk): in memory
    p = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype)
    out = p @ v
    if isinstance(controller, AttentionStore):
        if site.is_cross:
            amap = p.float().mean(1)
            rows = amap if controller.rows is None else amap[controller.rows]
            key = (site.block, site.level, site.index, site.kind)
            controller.maps[key] = controller.maps.get(key, 0) + rows
            controller.counts[key] = controller.counts.get(key, 0) + 1
            controller.sites[key] = site
        return out
    if isinstance(controller, EditedIDGating):
        lay = controller.layout
        if site.is_cross:
            if not (controller.src_branch >= 0).any():
                return out
            o, e, t = (lay.row(b) for b in range(3))
            edited = p[t].clone()
            for j in range(p.shape[-1]):
                b = int(controller.src_branch[j])
                if b >= 0:
                    edited[..., j] = p[(o, e)[b]][..., int(controller.src_token[j])]
            out[t] = edited @ v[t]
            return out
        if not controller._self_active(site, step):
            return out
        w = controller.weights(site, q.device)
        if w is None:
            return out
        w = w.to(p.dtype)[:, None, :, None]  # (3, 1, Nq, 1)
        for cond in [True, False] if controller.config.self_uncond and lay.cfg else [True]:
            rows = [lay.row(b, cond) for b in range(3)]
            if controller.config.mode == "map":
                mixed = sum(w[s] * p[r] for s, r in enumerate(rows))  # (h, Nq, Nk): the edited map
                out[rows[2]] = mixed @ v[rows[2]]
            else:
                out[rows[2]] = sum(w[s] * (p[r] @ v[r]) for s, r in enumerate(rows))
        return out
    if controller is not None:
        raise TypeError(
            f"bench/pipeline.py: no naive version of controller {type(controller).__name__}"
        )
    return out


class NaiveProcessor:
    """A diffusers attention processor that runs `naive_attention` with the controller of the
    current call."""

    def __init__(self, site, owner):
        self.site = site
        self.owner = owner

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        B, N, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        h = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // h
        q, k, v = (x.view(B, -1, h, d).transpose(1, 2) for x in (q, k, v))  # (B, h, N, d)
        side = int(round(math.sqrt(N)))
        out = naive_attention(q, k, v, self.site.at(side, side), self.owner.controller)
        out = out.transpose(1, 2).reshape(B, N, h * d)
        return attn.to_out[1](attn.to_out[0](out))


class RefUNet(torch.nn.Module):
    """diffusers' UNet behind minid's `forward(sample, t, context, controller)`."""

    def __init__(self, model, cfg):
        super().__init__()
        from minid.models.attention import Site

        self.model = model
        self.cfg = cfg
        self.controller = None
        order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        names = [n for n in model.attn_processors]  # "...attn1.processor"

        def key(n):
            parts = n.split(".")
            level = int(parts[1]) if parts[0] != "mid_block" else 0
            j = int(parts[3]) if parts[0] != "mid_block" else int(parts[2])
            return (order[parts[0]], level, j, parts[-2])

        procs, index = {}, {}
        for n in sorted(names, key=key):
            parts = n.split(".")
            block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[parts[0]]
            block_key = n.rsplit(".", 2)[0]
            index.setdefault(block_key, len(index))
            level = int(parts[1]) if parts[0] != "mid_block" else 0
            procs[n] = NaiveProcessor(
                Site(block, level, index[block_key], "self" if parts[-2] == "attn1" else "cross"),
                self,
            )
        model.set_attn_processor(procs)

    def forward(self, sample, timestep, context, controller=None):
        self.controller = controller
        try:
            return self.model(sample, timestep, encoder_hidden_states=context).sample
        finally:
            self.controller = None


def reference_stack(full: bool):
    import diffusers
    import transformers

    from minid.loading.checkpoint import StableDiffusion

    sd, size = minid_stack(full)  # the weights to copy
    clip_cfg, unet_cfg, vae_cfg, _ = configs(full)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=clip_cfg.vocab_size,
            hidden_size=clip_cfg.hidden_size,
            intermediate_size=clip_cfg.intermediate_size,
            num_hidden_layers=clip_cfg.num_hidden_layers,
            num_attention_heads=clip_cfg.num_attention_heads,
            max_position_embeddings=clip_cfg.max_position_embeddings,
            hidden_act=clip_cfg.hidden_act,
            layer_norm_eps=clip_cfg.layer_norm_eps,
            bos_token_id=0,
            eos_token_id=2,
            attn_implementation="eager",
        )
    ).eval()
    own = set(text.state_dict())
    # transformers 5 names the modules without the checkpoint's `text_model.` prefix (it renames on
    # loading)
    weights = {
        (k if k in own else k.removeprefix("text_model.")): t
        for k, t in sd.text_encoder.state_dict().items()
    }
    missing, unexpected = text.load_state_dict(weights, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(
            f"bench/pipeline.py: text encoder keys differ: missing {missing}, unexpected "
            f"{unexpected}"
        )
    unet = diffusers.UNet2DConditionModel(
        sample_size=unet_cfg.sample_size,
        in_channels=unet_cfg.in_channels,
        out_channels=unet_cfg.out_channels,
        down_block_types=unet_cfg.down_block_types,
        up_block_types=unet_cfg.up_block_types,
        block_out_channels=unet_cfg.block_out_channels,
        layers_per_block=unet_cfg.layers_per_block,
        attention_head_dim=unet_cfg.num_heads,
        cross_attention_dim=unet_cfg.cross_attention_dim,
        norm_num_groups=unet_cfg.norm_num_groups,
        norm_eps=unet_cfg.norm_eps,
        flip_sin_to_cos=unet_cfg.flip_sin_to_cos,
        freq_shift=unet_cfg.freq_shift,
        downsample_padding=unet_cfg.downsample_padding,
    ).eval()
    unet.load_state_dict(sd.unet.state_dict(), strict=True)
    levels = len(vae_cfg.block_out_channels)
    vae = diffusers.AutoencoderKL(
        in_channels=vae_cfg.in_channels,
        out_channels=vae_cfg.out_channels,
        latent_channels=vae_cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=vae_cfg.block_out_channels,
        layers_per_block=vae_cfg.layers_per_block,
        norm_num_groups=vae_cfg.norm_num_groups,
        sample_size=vae_cfg.sample_size,
    ).eval()
    vae.load_state_dict(sd.vae.state_dict(), strict=True)
    return StableDiffusion(
        tokenizer=sd.tokenizer,
        text_encoder=_RefText(text),
        unet=RefUNet(unet, unet_cfg),
        vae=_RefVAE(vae, vae_cfg.scaling_factor),
    ), size


# ---- measuring -----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StageMeter:
    """stage_hook for EditedID: peak memory per stage (CUDA allocator, or sampled RSS on CPU)."""

    def __init__(self, device: str):
        self.device = device
        self.peaks: dict[str, float] = {}
        self._peak = 0
        self._base = 0
        self._running = False

    def _sample(self):
        while self._running:
            self._peak = max(self._peak, _rss())
            time.sleep(0.002)

    def __call__(self, stage: str, what: str):
        if self.device == "cuda":
            torch.cuda.synchronize()
            if what == "start":
                torch.cuda.reset_peak_memory_stats()
            else:
                self.peaks[stage] = torch.cuda.max_memory_allocated() / 2**30
            return
        if what == "start":
            self._base = self._peak = _rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._running = False
            self._thread.join()
            self.peaks[stage] = (max(self._peak, _rss()) - self._base) / 2**30


def restore_configs(size: int, inner_steps: int) -> dict:
    """The RestoreConfigs the bench runs: "timed" (minid vs reference), "warmup", and one per
    Stage 2 choice under "inversions"."""
    from minid.method.editedid import EditedIDConfig
    from minid.method.null_text import NullTextConfig
    from minid.restore.config import RestoreConfig

    # fixed work per step
    fixed = NullTextConfig(inner_steps=inner_steps, epsilon=0.0, epsilon_growth=0.0)
    return {
        "timed": RestoreConfig(EditedIDConfig(null_text=fixed), image_size=size),
        "warmup": RestoreConfig(
            EditedIDConfig(null_text=NullTextConfig(inner_steps=1)), image_size=size
        ),
        # the defaults: ≤ 10 null-text updates, early stop
        "inversions": {
            inversion: RestoreConfig(EditedIDConfig(inversion=inversion), image_size=size)
            for inversion in INVERSIONS
        },
    }


def run_one(impl: str, device: str, full: bool, inner_steps: int, out_json: Path) -> None:
    from minid.restore.pipeline import EditedID

    torch.manual_seed(0)
    sd, size = (minid_stack if impl == "minid" else reference_stack)(full)
    dtype = torch.float16 if device == "cuda" else torch.float32
    for part in ("text_encoder", "unet", "vae"):
        getattr(sd, part).to(device, dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    low = torch.rand(2, 3, size // 32, size // 32, generator=g) * 2 - 1
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    face = torch.zeros(size, size)
    face[size // 8 : 5 * size // 8, size // 4 : 3 * size // 4] = 1
    glasses = torch.zeros(size, size)
    glasses[size // 4 : 3 * size // 8, size // 4 : 3 * size // 4] = 1
    restores = restore_configs(size, inner_steps)
    pipe = EditedID(sd, restores["timed"])
    # Warm-up: one whole restore with one null-text update per step, so every batch shape has been
    # seen (Triton kernels compiled, oneDNN/cuDNN primitives created, allocator primed) before the
    # timed run.
    warm = EditedID(sd, restores["warmup"])
    warm.restore(
        images[0:1],
        images[1:2],
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        face_mask=face,
        element_mask=glasses,
        progress=False,
    )
    meter = StageMeter(device)
    pipe.stage_hook = meter
    t0 = time.perf_counter()
    result = pipe.restore(
        images[0:1],
        images[1:2],
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        face_mask=face,
        element_mask=glasses,
        progress=False,
    )
    total = time.perf_counter() - t0
    torch.save(result.image, out_json.with_suffix(".pt"))
    if device == "cuda":
        process_peak = max(meter.peaks.values())
    else:
        import resource

        # KiB -> GiB, whole process
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record = {
        "impl": impl,
        "timings": result.timings,
        "peaks": meter.peaks,
        "total": total,
        "psnr": result.psnr,
        "size": size,
        "process_peak": process_peak,
    }
    # Stage 2's three ways, side by side on the same model and inputs, in this process
    if impl == "minid":
        record["inversions"] = {}
        for inversion, restore in restores["inversions"].items():
            pipe = EditedID(sd, restore)
            runs = []
            for _ in range(INVERSION_REPEATS):
                meter = StageMeter(device)
                pipe.stage_hook = meter
                t0 = time.perf_counter()
                result = pipe.restore(
                    images[0:1],
                    images[1:2],
                    P_O,
                    P_E,
                    ["man"],
                    ["glasses"],
                    face_mask=face,
                    element_mask=glasses,
                    progress=False,
                )
                runs.append(
                    {
                        "total": time.perf_counter() - t0,
                        "timings": result.timings,
                        "peaks": meter.peaks,
                        "calls": result.unet_calls,
                        "psnr": result.psnr,
                    }
                )
            runs.sort(key=lambda r: r["total"])
            record["inversions"][inversion] = runs[len(runs) // 2]  # the median run
    out_json.write_text(json.dumps(record))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--full", action="store_true", help="SD1.4 architecture at 512² (default on cuda)"
    )
    ap.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="null-text Adam updates per step, all run (default 10 on cuda, 3 on cpu)",
    )
    ap.add_argument("--impl", choices=["minid", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    full = args.full or args.device == "cuda"
    inner = (
        args.inner_steps if args.inner_steps is not None else (10 if args.device == "cuda" else 3)
    )
    if args.impl:
        run_one(args.impl, args.device, full, inner, args.json)
        return
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"minid-bench-pipeline-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    runs = {}
    for impl in ("minid", "reference"):
        path = scratch / f"{impl}.json"
        cmd = [
            sys.executable,
            __file__,
            "--device",
            args.device,
            "--impl",
            impl,
            "--json",
            str(path),
            "--inner-steps",
            str(inner),
        ] + (["--full"] if full else [])
        subprocess.run(cmd, check=True)
        runs[impl] = json.loads(path.read_text())
    diff = (
        (torch.load(scratch / "minid.pt") - torch.load(scratch / "reference.pt")).abs().max().item()
    )
    size = runs["minid"]["size"]
    cuda = args.device == "cuda"
    machine = (
        f"GPU {torch.cuda.get_device_name()}" if cuda else f"{torch.get_num_threads()} CPU threads"
    )
    lines = [
        f"# EditedID restore, minid vs diffusers with naive attention maps ({args.device})",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
        f"{machine}; "
        f"{'SD1.4 architecture' if full else 'small UNet (64-128-128-128, 1 layer per block)'} "
        f"with random weights, "
        f"{size}² images, 6 steps, {inner} null-text updates per step (no early stop), one run "
        f"each.",
        "",
        "| stage | minid time (s) | reference time (s) | minid peak (GiB) | reference peak (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in runs["minid"]["timings"]:
        lines.append(
            f"| {stage} | {runs['minid']['timings'][stage]:.2f} | "
            f"{runs['reference']['timings'][stage]:.2f} | "
            f"{runs['minid']['peaks'].get(stage, float('nan')):.3f} | "
            f"{runs['reference']['peaks'].get(stage, float('nan')):.3f} |"
        )
    lines.append(
        f"| **total** | {runs['minid']['total']:.2f} | {runs['reference']['total']:.2f} | "
        f"{runs['minid']['process_peak']:.3f} | {runs['reference']['process_peak']:.3f} |"
    )
    lines += [
        "",
        f"Max |restored_minid − restored_reference| = {diff:.3g} (images in [-1, 1]): the two "
        f"compute "
        "the same algorithm.",
        "Peak memory per stage: on CPU the growth of the resident set within the stage (sampled "
        "every 2 ms; "
        "after the warm-up run freed memory is reused, so this shows what a stage adds), on CUDA "
        "the peak "
        "allocated by PyTorch within the stage. Total row: on CPU the process's peak resident set "
        "(models, warm-up and Python included), on CUDA the largest stage peak.",
    ]
    lines += [
        "",
        "## Stage 2: null-text optimisation, direct inversion, negative-prompt inversion",
        "",
        f"minid alone, the same model, inputs and process; EditedIDConfig defaults otherwise "
        f"(null-text: at most "
        f"10 Adam updates per step with the early stop, which random weights never reach); median "
        f"of "
        f"{INVERSION_REPEATS} runs each. UNet calls: batched calls (forward / of them "
        f"differentiated).",
        "",
        "| Stage 2 | total (s) | align (s) | disentangle (s) | entangle (s) | UNet calls, all "
        "stages | "
        "disentangle calls | disentangle peak (GiB) | PSNR original / edited (dB) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    inversions = runs["minid"]["inversions"]
    base = inversions["null-text"]["total"]
    for name, r in inversions.items():
        forward = sum(c["forward"] for c in r["calls"].values())
        backward = sum(c["backward"] for c in r["calls"].values())
        d = r["calls"]["disentangle"]
        lines.append(
            f"| {name} | {r['total']:.2f} | {r['timings']['align']:.2f} | "
            f"{r['timings']['disentangle']:.2f} | "
            f"{r['timings']['entangle']:.2f} | {forward} / {backward} | {d['forward']} / "
            f"{d['backward']} | "
            f"{r['peaks'].get('disentangle', float('nan')):.3f} | {r['psnr']['original']:.1f} / "
            f"{r['psnr']['edited']:.1f} | {base / r['total']:.1f}× |"
        )
    lines += [
        "",
        "Speed-up: the null-text restore's total time over this row's. The reconstruction PSNR of "
        "direct "
        "inversion is the VAE's round trip alone (Stage 3 puts O and E back on their pivots "
        "exactly); with "
        "random weights no PSNR here says anything about image quality.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or REPO / "bench" / "results" / f"pipeline_{args.device}.md"
    from minid.method.editedid import EditedIDConfig

    clip_cfg, unet_cfg, vae_cfg, _ = configs(full)
    restores = restore_configs(size, inner)
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": args.device,
        "full": full,
        "inner_steps": inner,
        "dtype": "float16" if cuda else "float32",
        "threads": torch.get_num_threads(),
        "size": size,
        "model": {
            "weights": "random (randomize_, seeds 1 / 2 / 3; torch seed 0)",
            "text_encoder": clip_cfg,
            "unet": unet_cfg,
            "vae": vae_cfg,
        },
        "inputs": {
            "images": f"seed 5, {size // 32}² uniform noise upsampled bilinearly to {size}²",
            "face_mask": "rows [size/8, 5 size/8), columns [size/4, 3 size/4)",
            "element_mask": "rows [size/4, 3 size/8), columns [size/4, 3 size/4)",
            "prompts": [P_O, P_E],
            "id_words": ["man"],
            "element_words": ["glasses"],
        },
        "timed": restores["timed"],
        "warmup": restores["warmup"],
        "inversions": restores["inversions"],
        "inversion_repeats": INVERSION_REPEATS,
        "rss_sample_s": 0.002,
    }
    defaults = {}
    # the Stage 2 row that runs the shipped method unmodified (EditedIDConfig()'s own inversion)
    shipped = EditedIDConfig()
    row = restores["inversions"].get(shipped.inversion)
    if row is not None and row.method == shipped:
        config["inversion_shipped_method"] = shipped
        defaults["inversion_shipped_method"] = "minid.method.editedid.EditedIDConfig"
    write_results(out, text, config, defaults)


if __name__ == "__main__":
    main()
