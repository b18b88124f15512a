"""Reading the published Stable Diffusion 1.4 weights into minid's models.

Two layouts are read, both only as `.safetensors` (a pickle checkpoint is refused: loading one runs
code):

- the diffusers "hub" folder of CompVis/stable-diffusion-v1-4: `unet/`, `vae/`, `text_encoder/`,
  `tokenizer/`, each weight file in the variants fp32 (`diffusion_pytorch_model.safetensors`,
  `model.safetensors`), fp16 (`*.fp16.safetensors`) and, for the UNet only, non_ema
  (`*.non_ema.safetensors`). minid's module names ARE these key names, so a hub file needs only two
  fixes: the fp32 VAE file's old mid-attention names (`query/key/value/proj_attn`, renamed to
  `to_q/to_k/to_v/to_out.0`) and the text encoder's `position_ids` (dropped: the model makes it as
  `arange(77)`).
- the original single-file LDM (CompVis) layout: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*` (CLIP), 12 noise-schedule
  buffers (ignored: minid computes the schedule), and in the full-EMA file `model_ema.*`, an EMA
  copy of the UNet with the dots taken out of the names. Its names follow from the hub names through
  the key map of minid.loading.keymap.

Every load checks every name and shape before reading a byte of data and reports all problems in one
error. Tensors are read one by one from a memory-mapped file straight into the target dtype and
device, into a model built on the meta device (no random weights are allocated first), so peak
memory stays near the model's size.

Getting the files (download verified against `weights/manifest.json`, pickle conversion) is
minid.loading.download. Commands: `minid download`, `minid convert`, `minid keymap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from minid.loading.keymap import LDM_PREFIX, ldm_key_map
from minid.loading.tensorfile import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorInfo,
    read_header,
    read_tensors,  # noqa: F401
    # CheckpointError: what a failed load raises, importable from here
    refuse_pickle,
)
from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig, load_json

# the checkout: minid/loading/checkpoint.py -> the repository
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = ROOT / "weights" / "sd-v1-4"

COMPONENTS = ("unet", "vae", "text_encoder")

# Hub weight files: component -> variant -> file name inside the component's folder.
HUB_WEIGHT_NAMES = {
    "unet": {
        "fp32": "diffusion_pytorch_model.safetensors",
        "fp16": "diffusion_pytorch_model.fp16.safetensors",
        "non_ema": "diffusion_pytorch_model.non_ema.safetensors",
    },
    "vae": {
        "fp32": "diffusion_pytorch_model.safetensors",
        "fp16": "diffusion_pytorch_model.fp16.safetensors",
    },
    "text_encoder": {"fp32": "model.safetensors", "fp16": "model.fp16.safetensors"},
}

# The DDPM schedule the LDM training code stored beside the weights; minid recomputes it
# (schedule.py).
LDM_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)
# Bookkeeping scalars of the EMA (its decay and step count), not weights.
LDM_EMA_SCALARS = frozenset({"model_ema.decay", "model_ema.num_updates"})
# The fp32 hub VAE was saved by an older diffusers that named the mid-block attention's projections
# so.
OLD_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
POSITION_IDS = "text_model.embeddings.position_ids"


# --------------------------------------------------------------------------------------------------
# Matching a file's tensors to a model's state dict


def _model_class(component: str) -> type[nn.Module]:
    # Imported on use: download/convert/keymap work without building (or even importing) the
    # networks.
    if component == "unet":
        from minid.models.unet import UNet

        return UNet
    if component == "vae":
        from minid.models.vae import VAE

        return VAE
    if component == "text_encoder":
        from minid.models.clip import CLIPTextModel

        return CLIPTextModel
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def _is_ldm(header: dict[str, TensorInfo]) -> bool:
    return any(k.startswith(tuple(LDM_PREFIX.values())) for k in header)


def _hub_file_key(component: str, key: str, header: dict[str, TensorInfo]) -> str:
    """The name of a model key in a hub file: itself, or the old VAE attention name when the file
    uses it, or for the text encoder the name without `text_model.` (files saved by transformers 5
    drop that prefix)."""
    if (
        component == "text_encoder"
        and key not in header
        and key.removeprefix("text_model.") in header
    ):
        return key.removeprefix("text_model.")
    if component == "vae" and key not in header:
        parts = key.split(".")
        # (encoder|decoder).mid_block.attentions.0.<to_q|to_k|to_v|to_out.0>.<weight|bias>
        if len(parts) >= 6 and parts[1] == "mid_block" and parts[2] == "attentions":
            new = ".".join(parts[4:-1])
            for old, name in OLD_VAE_ATTENTION_NAMES.items():
                if new == name:
                    return ".".join([*parts[:4], old, parts[-1]])
    return key


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _match(
    component: str,
    path: Path,
    header: dict[str, TensorInfo],
    expected: dict[str, torch.Size],
    cfg,
    ema: bool | None,
) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Pair every model key with its file key, check every shape, and raise ONE error listing every
    missing, mis-shaped and unexpected tensor. Returns (model key -> file key, model key -> shape to
    read into)."""
    ldm = _is_ldm(header)
    if ldm:
        has_ema = any(k.startswith("model_ema.") and k not in LDM_EMA_SCALARS for k in header)
        if component == "unet" and ema and not has_ema:
            raise CheckpointError(
                f"{path}: ema=True, but the file has no EMA copy of the UNet (model_ema.*); "
                "load with ema=None or ema=False"
            )
        # Default for a full-EMA file: the EMA weights. They are what the LDM code samples with (its
        # `ema_scope`), what the pruned sd-v1-4 file and the hub's main unet file hold; the plain
        # `model.diffusion_model.*` weights of that file are the raw training weights (the hub's
        # non_ema file).
        use_ema = component == "unet" and has_ema and ema is not False
        names = ldm_key_map(component, expected, cfg, ema=use_ema)
        # The tensors this load reads; with EMA, `model.diffusion_model.*` is the unused
        # alternative.
        own = ("model_ema.",) if use_ema else (LDM_PREFIX[component],)
        ignored = (
            LDM_SCHEDULE_BUFFERS | LDM_EMA_SCALARS | {LDM_PREFIX["text_encoder"] + POSITION_IDS}
        )

        def is_unexpected(k: str) -> bool:
            if k in ignored or k in used:
                return False
            if k.startswith(own):
                return True
            # Keys of the other components belong to their loads; anything outside every known part
            # is reported.
            return not k.startswith(tuple(LDM_PREFIX.values()) + ("model_ema.",))
    else:
        if ema is True and component == "unet" and path.name.endswith(".non_ema.safetensors"):
            raise CheckpointError(
                f"{path}: ema=True, but this is the hub's non-EMA UNet file; load the main "
                "unet file (variant=None, 'fp32' or 'fp16') for the EMA weights"
            )
        names = {k: _hub_file_key(component, k, header) for k in expected}

        def is_unexpected(k: str) -> bool:
            return k not in used and k not in (
                POSITION_IDS,
                POSITION_IDS.removeprefix("text_model."),
            )

    used = set(names.values())
    missing, wrong, shapes = [], [], {}
    for key, file_key in names.items():
        want = tuple(expected[key])
        info = header.get(file_key)
        if info is None:
            missing.append(f"  {file_key}  (expected shape {_shape(want)})")
        elif info.shape == want or (
            ldm
            and component == "vae"
            and info.shape == (*want, 1, 1)
            and ".mid.attn_1." in file_key
        ):
            # (LDM stores the VAE attention projections as 1×1 convs: read them as Linear)
            shapes[key] = want
        else:
            wrong.append(f"  {file_key}  expected {_shape(want)}, found {_shape(info.shape)}")
    unexpected = [f"  {k}  {_shape(info.shape)}" for k, info in header.items() if is_unexpected(k)]
    if missing or wrong or unexpected:
        what = [
            f"{path}: does not match the {component} architecture "
            f"({'single-file LDM' if ldm else 'hub'} layout):"
        ]
        for title, rows in (
            ("missing", missing),
            ("wrong shape", wrong),
            ("unexpected", unexpected),
        ):
            if rows:
                what.append(f"{len(rows)} {title}:")
                what += rows[:25] + ([f"  ... and {len(rows) - 25} more"] if len(rows) > 25 else [])
        what.append(
            "What to do: if the file is damaged or incomplete, download it again; if it is another "
            "architecture, pass the matching config (a folder with config.json); a checkpoint that "
            "is "
            "not SD1.x cannot be loaded into these models."
        )
        raise CheckpointError("\n".join(what))
    return names, shapes


def _load_component(
    component: str, path: str | Path, cfg, dtype: torch.dtype, device, ema: bool | None
):
    path = Path(path)
    cls = _model_class(component)
    with torch.device("meta"):
        model = cls(cfg)  # shapes only; no memory, no random init
    expected = {k: v.shape for k, v in model.state_dict().items()}
    header = read_header(path)
    names, shapes = _match(component, path, header, expected, cfg, ema)
    ints = [k for k in names.values() if header[k].dtype not in FLOAT_DTYPES]
    if ints:
        raise CheckpointError(
            f"{path}: {len(ints)} {component} tensor(s) stored as a non-float dtype, e.g. "
            f"{ints[0]!r} as {header[ints[0]].dtype}; model weights are {', '.join(FLOAT_DTYPES)}. "
            "The file is damaged or not a model: download or convert it again"
        )
    state = read_tensors(path, names, dtype=dtype, device=device, shapes=shapes)
    model.load_state_dict(state, strict=True, assign=True)
    # Every tensor of the model must come from the file: a buffer outside the state dict would stay
    # on the meta device, empty, and fail at the first forward far from here. The models compute
    # such values in forward instead (CLIP's positions), so this holds by construction; the check
    # keeps it so.
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(
            f"{path}: {component} tensors not in the state dict stayed on the meta device after "
            f"loading: {', '.join(empty)}. Expected none; compute them in forward (as "
            f"minid/models/clip.py "
            "does its positions) rather than registering a non-persistent buffer."
        )
    # Pretrained inference weights: frozen and in eval mode (call requires_grad_(True) to
    # fine-tune).
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Finding files and configs


def _config_class(component: str):
    return {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}[component]


def _component_folder(path: Path, component: str) -> Path:
    """The folder with `component`'s files: `path/component` in a hub folder, or `path` itself."""
    return path / component if (path / component).is_dir() else path


def _hub_weight_file(
    folder: Path, component: str, variant: str | None, dtype: torch.dtype, ema: bool | None
) -> Path:
    names = HUB_WEIGHT_NAMES[component]
    if variant is not None and variant not in ("fp32", "fp16", "non_ema"):
        raise ValueError(f"variant must be None, 'fp32', 'fp16' or 'non_ema'; got {variant!r}")
    if component == "unet" and (variant == "non_ema" or (variant is None and ema is False)):
        order = ["non_ema"]  # the hub's only non-EMA weights; ema=False asks for them
    elif variant in ("fp32", "fp16"):
        order = [variant]
    else:  # None: the file nearest the asked dtype first, the other precision next
        order = ["fp16", "fp32"] if dtype in (torch.float16, torch.bfloat16) else ["fp32", "fp16"]
    for v in order:
        if (folder / names[v]).is_file():
            return folder / names[v]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: no {component} weight file {' or '.join(names[v] for v in order)} "
        f"(folder holds: {', '.join(present) or 'nothing'}). Download it with\n"
        f"    minid download --dest {folder.parent if folder.name == component else folder}"
        f" --precision {'fp32' if order[0] != 'fp16' else 'fp16'}"
    )


def _resolve(component: str, path: str | Path, variant, dtype, ema, config, config_folder):
    """(weight file, config) for a component from a hub folder, a component folder or a weight
    file."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        folder = _component_folder(path, component)
        weights = _hub_weight_file(folder, component, variant, dtype, ema)
        config_folder = config_folder or folder
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(
            f"{path}: not found (expected a hub folder with {component}/, a {component} folder "
            "or a .safetensors file); download with minid download"
        )
    if config is None:
        config = _config_class(component)()  # SD1.4 defaults
        if config_folder is not None:
            cfg_file = _component_folder(Path(config_folder), component) / "config.json"
            if cfg_file.is_file():
                config = _config_class(component).from_dict(load_json(cfg_file), cfg_file)
    return weights, config


def load_unet(
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    ema: bool | None = None,
    config: UNetConfig | None = None,
    config_folder: str | Path | None = None,
):
    """A `minid.models.unet.UNet` from a hub folder, its `unet/` folder, a hub unet file or a single
    LDM file.

    variant: None (fp16 file for fp16/bf16, else fp32, whichever exists), 'fp32', 'fp16' or
    'non_ema'. ema: for a full-EMA single file, True (default) reads `model_ema.*`, False the raw
    `model.diffusion_model.*`; for a hub folder, False selects the non_ema file.
    config: the architecture; default: `config.json` beside the weights (or in `config_folder`),
    else SD1.4.
    """
    weights, cfg = _resolve("unet", path, variant, dtype, ema, config, config_folder)
    return _load_component("unet", weights, cfg, dtype, device, ema)


def load_vae(
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    config: VAEConfig | None = None,
    config_folder: str | Path | None = None,
):
    """A `minid.models.vae.VAE`; arguments as `load_unet` (the VAE has no EMA copy)."""
    weights, cfg = _resolve("vae", path, variant, dtype, None, config, config_folder)
    return _load_component("vae", weights, cfg, dtype, device, None)


def load_text_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    config: CLIPTextConfig | None = None,
    config_folder: str | Path | None = None,
):
    """A `minid.models.clip.CLIPTextModel`; arguments as `load_unet`."""
    weights, cfg = _resolve("text_encoder", path, variant, dtype, None, config, config_folder)
    return _load_component("text_encoder", weights, cfg, dtype, device, None)


@dataclass(frozen=True)
class StableDiffusion:
    """The four parts of SD1.4 that minid runs (the scheduler is math in minid.sampling.schedule,
    not weights)."""

    tokenizer: Any  # minid.models.tokenizer.CLIPTokenizer
    text_encoder: nn.Module  # minid.models.clip.CLIPTextModel
    unet: nn.Module  # minid.models.unet.UNet
    vae: nn.Module  # minid.models.vae.VAE


def load_tokenizer(
    path: str | Path,
    config_folder: str | Path | None = None,
    tokenizer_folder: str | Path | None = None,
) -> Any:
    """The CLIP tokenizer (a minid.models.tokenizer.CLIPTokenizer) for the weights at `path`, a hub
    folder or a file.

    From `tokenizer_folder` when given; else from the first of the hub folder's `tokenizer/` and
    `config_folder/tokenizer` that holds a vocab.json; else the copy that ships with minid
    (`CLIPTokenizer.default()`), which is SD1.4's byte for byte: a single file carries no tokenizer,
    and every SD1.x checkpoint uses OpenAI CLIP's vocabulary unchanged.
    """
    from minid.models.tokenizer import CLIPTokenizer

    path = Path(path)
    if tokenizer_folder is not None:
        folder = Path(tokenizer_folder)
    else:
        candidates = [path / "tokenizer"] if path.is_dir() else []
        if config_folder is not None:
            candidates.append(Path(config_folder) / "tokenizer")
        folder = next((c for c in candidates if (c / "vocab.json").is_file()), None)
        if folder is None:
            return CLIPTokenizer.default()
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: CLIP tokenizer file(s) {', '.join(missing)} not found; a tokenizer "
            "folder holds vocab.json and merges.txt. Pass tokenizer_folder=<a folder with both>, "
            "or none to use the copy that ships with minid"
        )
    return CLIPTokenizer.from_folder(folder)


# The dtypes the models run in, by the names the command line and the API take.
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def check_device_dtype(
    device: str | torch.device,
    dtype: str | torch.dtype,
    what: tuple[str, str] = ("device", "dtype"),
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load onto, checked before any file is read: a dtype name of `DTYPES`
    or one of its torch dtypes; a device this machine has. `what` names the two in messages (the
    CLI's flags)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{what[1]} {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    elif dtype not in DTYPES.values():
        raise TypeError(
            f"{what[1]} must be torch.float32, torch.float16 or torch.bfloat16 (or 'fp32', 'fp16', "
            f"'bf16'), "
            f"got {dtype!r}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{what[0]} {device!r} is not a device PyTorch knows; use 'cpu' or 'cuda' ('cuda:1' "
            f"for "
            "the second GPU)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this PyTorch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(
                f"{what[0]} {device!r} asked for, but PyTorch sees no CUDA GPU{build}; use 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{what[0]} {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered from 0"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"{what[0]} {device!r} asked for, but PyTorch sees no Apple GPU (MPS); use 'cpu'"
            )
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{what[0]} {device!r}: minid runs on 'cpu', 'cuda' or 'mps'")
    return dev, dtype


def load_stable_diffusion(
    source: str | Path = DEFAULT_WEIGHTS,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    ema: bool | None = None,
    config_folder: str | Path | None = None,
    tokenizer_folder: str | Path | None = None,
) -> StableDiffusion:
    """Load tokenizer, text encoder, UNet and VAE from a hub folder or a single LDM `.safetensors`
    file.

    A hub folder supplies its own config.json files. For a single file, the architecture comes from
    `config_folder` (a hub folder's configs) when given, else the SD1.4 defaults. The tokenizer: see
    `load_tokenizer`. dtype: a torch dtype or its name ('fp32', 'fp16', 'bf16'); both are checked
    first (`check_device_dtype`).
    """
    device, dtype = check_device_dtype(device, dtype)
    source = Path(source)
    refuse_pickle(source)
    if not (source.is_dir() or source.is_file()):
        raise CheckpointError(
            f"{source}: not found. Download SD1.4 with: minid download "
            f"--dest {DEFAULT_WEIGHTS} (or pass a hub folder or a single .safetensors file)"
        )
    kw = dict(dtype=dtype, device=device, variant=variant, config_folder=config_folder)
    return StableDiffusion(
        tokenizer=load_tokenizer(source, config_folder, tokenizer_folder),
        text_encoder=load_text_encoder(source, **kw),
        unet=load_unet(source, ema=ema, **kw),
        vae=load_vae(source, **kw),
    )
