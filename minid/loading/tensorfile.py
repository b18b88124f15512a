"""Reading .safetensors files without trusting them: the header's names, shapes and dtypes, checked
against the bytes the file holds (a cut-off download or a corrupt header is named, with the file),
tensors read through bounded memory mappings, and pickles refused (they can run code when loaded;
`minid convert` turns one into a .safetensors file on purpose).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# Source bytes read through one mapping of the file before it is closed. Pages of a mapping that
# were read count towards the process's resident memory until the mapping is closed, so reading a
# whole 3.4 GB fp32 file through one mapping would hold it all resident beside the converted copy;
# closing and reopening every 256 MiB bounds that overhead to 256 MiB (≈ 0.15 × the fp16 UNet) at no
# measurable cost.
MAPPED_WINDOW_BYTES = 256 * 2**20

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weight file that cannot be loaded as asked; the message says which file, what is wrong,
    what to do."""


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what model weights are stored as
# The first bytes of what torch.save writes: a zip archive (PyTorch ≥ 1.6) or a bare pickle
# (protocol 2+).
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: F32, F16, BF16, I64, ...


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a .safetensors file, checking that the file holds every byte its
    header describes (a cut-off download is the usual reason it does not).

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets}}, data.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if raw.startswith(PICKLE_MAGIC):
            raise CheckpointError(
                f"{path}: a pickle checkpoint (what torch.save writes), whatever its name, not a "
                f".safetensors file; convert it once: minid convert {path} "
                f"{path.with_name(path.stem + '-converted.safetensors')}"
            )
        if len(raw) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes, too short to be a .safetensors file; delete it and "
                "download or convert it again"
            )
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or not a .safetensors file (header of {n} bytes, file of "
                f"{size} bytes); delete it and download or convert it again"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path}: not a .safetensors file (header is not JSON: {e})"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a .safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: {size} bytes, but its header describes {8 + n + end} bytes "
            "(an interrupted download?); delete it and download it again "
            "(minid download)"
        )
    return {
        name: TensorInfo(tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items()
    }


def _check_entry(path: Path, name: str, entry) -> None:
    """One header entry {dtype, shape, data_offsets}: a known dtype, and a byte range as long as its
    shape needs (a damaged header would otherwise fail deep inside safetensors, without the file's
    name)."""
    try:
        dtype, shape, (start, stop) = (
            entry["dtype"],
            [int(n) for n in entry["shape"]],
            entry["data_offsets"],
        )
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: damaged header: the entry of tensor {name!r} is not "
            "{dtype, shape, data_offsets}; download or convert the file again"
        ) from None
    if dtype not in _DTYPE_BYTES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has the unknown dtype {dtype!r}; download or convert the "
            "file again"
        )
    need = math.prod(shape) * _DTYPE_BYTES[dtype]
    if not (isinstance(start, int) and isinstance(stop, int)) or start < 0 or stop - start != need:
        raise CheckpointError(
            f"{path}: damaged header: tensor {name!r} ({dtype}, shape {list(shape)}) needs {need} "
            f"bytes, its byte range [{start}, {stop}) does not match; download or convert the "
            "file again"
        )


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: a pickle checkpoint; minid reads only .safetensors (loading a pickle can run "
            f"code). Convert it "
            f"once, reading tensors only: minid convert {path} {path.with_suffix('.safetensors')}"
        )


def read_tensors(
    path: str | Path,
    names: dict[str, str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    shapes: dict[str, tuple[int, ...]] | None = None,
    window_bytes: int = MAPPED_WINDOW_BYTES,
) -> dict[str, torch.Tensor]:
    """Read tensors from a memory-mapped .safetensors file: `names` maps the key to return -> the
    file's key.

    Each tensor is copied into fresh memory of `dtype` (None: the file's dtype) on `device` and
    reshaped to `shapes[key]` when given (a 1×1 conv weight read into a Linear weight). The result
    never aliases the file, so it stays valid if the file is replaced. The file is reopened every
    `window_bytes` of source data (see MAPPED_WINDOW_BYTES).
    """
    # imported here: `download` and `convert` do not need it
    from safetensors import SafetensorError, safe_open

    items = list(names.items())
    out: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(items):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            read = 0
            while i < len(items) and read < window_bytes:
                key, file_key = items[i]
                try:
                    src = f.get_tensor(file_key)
                except SafetensorError as e:
                    raise CheckpointError(
                        f"{path}: tensor {file_key!r} could not be read ({e}); the file is "
                        f"damaged: "
                        "download or convert it again"
                    ) from None
                read += src.numel() * src.element_size()
                shape = shapes[key] if shapes is not None else src.shape
                dst = torch.empty(shape, dtype=dtype or src.dtype, device=device)
                # converts dtype (and moves to the device) in one copy
                dst.copy_(src.reshape(shape))
                out[key] = dst
                del src
                i += 1
    return out
