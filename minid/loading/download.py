"""Getting SD1.4's weight files ready to load: download, verification, conversion.

`download` fetches the hub files through `huggingface_hub`, pinned to one revision, and verifies
each against `weights/manifest.json` (size and sha256; a `.verified` sidecar saves hashing a checked
file again). `convert` turns a pickle checkpoint into safetensors, once, with
`torch.load(weights_only=True)`, since minid.loading.checkpoint reads only safetensors. The commands
are `minid download`, `minid convert`, `minid keymap` and `minid manifest`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from minid.loading.checkpoint import (
    COMPONENTS,
    DEFAULT_WEIGHTS,
    HUB_WEIGHT_NAMES,
    ROOT,
    CheckpointError,
)
from minid.loading.files import sha256_file

REPO_ID = "CompVis/stable-diffusion-v1-4"
# The commit whose files weights/manifest.json describes; pinning it keeps every download
# verifiable.
REVISION = "133a221b8aa7292a167afc5127cb63fb5005638b"
MANIFEST = ROOT / "weights" / "manifest.json"

# The small files of a hub folder that the loader and the pipeline read.
HUB_SMALL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
)


# --------------------------------------------------------------------------------------------------
# Download and verification


def load_manifest(path: str | Path = MANIFEST) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: manifest not found (it ships in the repository's weights/ folder)"
        )
    return json.loads(path.read_text())


def hub_files(precision: str = "fp16", components: Iterable[str] = COMPONENTS) -> list[str]:
    """The hub files a minid run needs: the small files and each component's weights in
    `precision`."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32'; got {precision!r}")
    return list(HUB_SMALL_FILES) + [f"{c}/{HUB_WEIGHT_NAMES[c][precision]}" for c in components]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def verify_file(
    path: str | Path, expected: dict[str, Any], log: Callable[[str], None] = print
) -> None:
    """Check a file's size and sha256 against the manifest entry; raise CheckpointError when they
    differ.

    A `<file>.verified` sidecar remembers size, mtime and hash, so a file checked once is not hashed
    again.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    st = path.stat()
    mark = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected["sha256"]}
    side = _sidecar(path)
    if side.is_file():
        try:
            if json.loads(side.read_text()) == mark:
                return
        except json.JSONDecodeError:
            pass
    if st.st_size != expected["bytes"]:
        short = st.st_size < expected["bytes"]
        why = "truncated: an interrupted download?" if short else "not the published file"
        raise CheckpointError(f"{path}: {st.st_size} bytes, expected {expected['bytes']} ({why})")
    log(f"verifying {path.name} ({st.st_size / 2**20:.0f} MiB) ...")
    digest = sha256_file(path)
    if digest != expected["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest}, expected {expected['sha256']} (damaged or not the "
            "published file)"
        )
    side.write_text(json.dumps(mark))


def default_precision() -> str:
    """The precision the models will run in here: fp16 on a CUDA GPU, fp32 on a CPU (which runs fp16
    badly)."""
    return "fp16" if torch.cuda.is_available() else "fp32"


def download(
    dest: str | Path = DEFAULT_WEIGHTS,
    precision: str = "fp16",
    repo: str = REPO_ID,
    revision: str = REVISION,
    components: Iterable[str] = COMPONENTS,
    manifest: str | Path | dict = MANIFEST,
    fetch: Callable[..., str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch the SD1.4 hub files minid needs into `dest` and verify each against the manifest.

    precision: "fp16" or "fp32" (`default_precision()` is what this machine runs: fp32 without a
    GPU; the `minid download` command fetches that by default).
    Files already present and verified are kept (no network needed: works with HF_HUB_OFFLINE=1); a
    present file that fails verification is fetched again. The small files (configs, tokenizer) are
    fetched when they can be; one that cannot is skipped with a note, since the loaders fall back
    to minid's own SD1.4 configs and CLIP tokenizer: copying the three weight files by hand is
    enough. `fetch` defaults to
    `huggingface_hub.hf_hub_download` (which shows progress and resumes interrupted downloads);
    tests pass their own. Returns `dest`.
    """
    import huggingface_hub

    dest = Path(dest)
    entries = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    entries = entries.get("files", entries)
    if fetch is None:
        fetch = huggingface_hub.hf_hub_download  # looked up now, so it can be replaced in tests
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    again = f"minid download --dest {dest} --precision {precision}"
    names = hub_files(precision, components)
    weight_files = [n for n in names if n not in HUB_SMALL_FILES]
    weight_bytes = sum(entries.get(n, {}).get("bytes", 0) for n in weight_files)
    by_hand = (
        f"or, without a network, copy the {len(weight_files)} weight files of {repo} (revision "
        f"{revision[:8]}, {weight_bytes / 1e9:.1f} GB) into {dest}, keeping their folders: "
        f"{', '.join(weight_files)} (the configs and tokenizer files are optional: minid has "
        "SD1.4's own)"
    )
    skipped: list[str] = []  # small files that could not be fetched: minid's own copies serve
    missing = [n for n in names if not (dest / n).is_file()]
    if missing and not offline:
        from minid.loading.files import check_writable

        check_writable(dest, "weights folder")  # before the first byte is fetched
        size = sum(entries[n]["bytes"] for n in missing if n in entries)
        log(
            f"SD1.4 {precision} weights: fetching {len(missing)} file(s), {size / 1e9:.1f} GB, "
            f"into {dest}"
        )
    # the weights first: a network that is down shows on the first file that matters
    for name in weight_files + [n for n in names if n in HUB_SMALL_FILES]:
        if name not in entries:
            raise CheckpointError(
                f"{name}: not in the manifest {manifest if not isinstance(manifest, dict) else ''}"
                "; it cannot be verified"
            )
        local = dest / name
        if local.is_file():
            try:
                verify_file(local, entries[name], log)
                continue
            except CheckpointError as e:
                if offline:
                    raise CheckpointError(
                        f"{e}\nHF_HUB_OFFLINE is set, so it cannot be fetched again: delete "
                        f"it and run, online:\n    {again}"
                    ) from None
                log(f"{e}; fetching it again")
                local.unlink()
                _sidecar(local).unlink(missing_ok=True)
        elif offline and name in HUB_SMALL_FILES:
            skipped.append(name)
            continue
        elif offline:
            raise CheckpointError(
                f"{local}: missing, and HF_HUB_OFFLINE is set. Run, online:\n    {again}\n"
                f"or copy the file {name} of {repo} (revision {revision}) there."
            )
        log(f"fetching {name} from {repo}@{revision[:8]}")
        try:
            got = Path(fetch(repo_id=repo, filename=name, revision=revision, local_dir=str(dest)))
        # network, authentication, missing file: all end here with the same advice
        except Exception as e:
            if name in HUB_SMALL_FILES:
                skipped.append(name)
                continue
            raise CheckpointError(
                f"{name}: download from {repo} failed ({type(e).__name__}: {e}). Check the "
                f"network (or HF_ENDPOINT), then run again:\n    {again}\n"
                f"(files already fetched are kept; an interrupted file resumes)\n{by_hand}"
            ) from e
        if got.resolve() != local.resolve():
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, local)
        try:
            verify_file(local, entries[name], log)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nThe downloaded file does not match the manifest; it was left in place for "
                f"inspection. Delete it and run again:\n    {again}"
            ) from None
    if skipped:
        log(
            f"note: {len(skipped)} small file(s) of {repo} not fetched ({', '.join(skipped)}); "
            "minid uses its own SD1.4 configs and CLIP tokenizer in their place"
        )
    return dest


def build_manifest(layouts: str | Path, hub_folder: str | Path) -> dict[str, Any]:
    """The manifest: bytes and sha256 of every weight file (from layouts.json, which records the
    hub's LFS pointers) and of every small file (hashed from a folder holding the hub's small
    files)."""
    lay = json.loads(Path(layouts).read_text())
    files = {
        name: {"bytes": entry["bytes"], "sha256": entry["sha256"]}
        for name, entry in lay["hub_files"].items()
    }
    for name in HUB_SMALL_FILES:
        p = Path(hub_folder) / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {"repo": REPO_ID, "revision": REVISION, "files": dict(sorted(files.items()))}


# --------------------------------------------------------------------------------------------------
# Converting a pickle checkpoint


@dataclass
class ConvertSummary:
    src: Path
    dst: Path
    tensors: int
    bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count
    # entries that are not tensors (step counters, ...)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        mib = self.bytes / 2**20
        text = f"{self.src} -> {self.dst}: {self.tensors} tensors ({dtypes}), {mib:.1f} MiB"
        if self.skipped:
            text += (
                f"; skipped {len(self.skipped)} non-tensor entries: {', '.join(self.skipped[:10])}"
            )
        return text


def convert(
    src: str | Path,
    dst: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ConvertSummary:
    """Convert a pickle checkpoint (.ckpt/.bin/.pt/.pth) to .safetensors, keeping its names.

    Read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only and
    refuses anything that would run code. A top-level `state_dict` entry (Lightning checkpoints) is
    unwrapped; entries that are not tensors are skipped and listed. The output is written to a
    temporary file and renamed, so an interrupted conversion never leaves a partial `dst`; an
    existing `dst` is kept unless `overwrite`.
    """
    from safetensors.torch import save_file

    from minid.loading.files import check_writable

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if not src.is_file():
        raise CheckpointError(
            f"{src}: not found" + (" (a folder; give the checkpoint file)" if src.is_dir() else "")
        )
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: is the input checkpoint; give another output path")
    if dst.is_dir():
        raise CheckpointError(
            f"{dst}: is a folder; give the output file, e.g. "
            f"{dst / src.with_suffix('.safetensors').name}"
        )
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"{dst}: already exists; pass overwrite=True (--overwrite) to replace it"
        )
    check_writable(dst.parent, "output folder")  # before reading gigabytes
    obj = _load_pickle(src)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{src}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors, skipped, seen = {}, [], set()
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            skipped.append(str(name))
            continue
        # safetensors stores each tensor on its own: views sharing storage (tied weights) are copied
        # apart.
        ptr = (
            (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        )
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add(ptr)
        tensors[str(name)] = value
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        # an overwritten file keeps its mode (a new one gets the umask's, as from open)
        if dst.is_file():
            os.chmod(tmp, dst.stat().st_mode & 0o7777)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    summary = ConvertSummary(
        src=src,
        dst=dst,
        tensors=len(tensors),
        bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        skipped=skipped,
    )
    log(str(summary))
    return summary


def _load_pickle(src: Path):
    """torch.load(weights_only=True) of `src`, its failures as one CheckpointError that names the
    file."""
    try:
        try:
            return torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # old (non-zip) pickle files cannot be memory-mapped: read them whole
            if "mmap" not in str(e):
                raise
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({blocked.group(1)})" if blocked else ""
        raise CheckpointError(
            f"{src}: refused: the pickle asks to run or build something other than tensors and "
            f"plain containers{what}; only a checkpoint of tensors is converted"
        ) from None
    # not a pickle, a damaged one, a truncated zip: torch says it in many ways
    except Exception as e:
        raise CheckpointError(
            f"{src}: not a PyTorch checkpoint that can be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'no details'})"
        ) from None
