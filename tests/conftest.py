"""Shared fixtures: SD1.4's published small files, the tiny SD stack (in memory and as a hub
folder), the tiny face pack, threads and seeds.

Everything the tests read ships with the repository: the SD1.4 configs and layouts in
tests/data/sd14, the tokenizer files in the package (minid/assets/clip). The helpers behind the
fixtures are tests/tiny_models.py (the tiny SD stack) and tests/tiny_faces.py (the tiny ONNX face
models).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from minid.models.tokenizer import DEFAULT_FOLDER as TOKENIZER_FILES

# Without a GPU, the Triton kernels run in Triton's interpreter. Triton reads this when it is first
# imported (which may happen inside a reference library), so it is set here, before any test module
# is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SD14_DATA = Path(__file__).resolve().parent / "data" / "sd14"


@pytest.fixture(scope="session")
def sd14_reference(tmp_path_factory) -> Path:
    """SD1.4's published small files: `hub/` (model_index.json, the configs, `tokenizer/`) and
    layouts.json.

    The repository keeps the tokenizer's vocab.json and merges.txt once, in the package; this folder
    joins them with tests/data/sd14, so `hub/` is laid out as the published repository's small
    files.
    """
    root = tmp_path_factory.mktemp("sd14")
    shutil.copytree(SD14_DATA, root, dirs_exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_FILES / name, root / "hub" / "tokenizer" / name)
    return root


@pytest.fixture(scope="session")
def tiny_sd():
    """The tiny random SD stack of tiny_models.py (real CLIP tokenizer), built once per test
    session."""
    from tiny_models import build_tiny_sd

    return build_tiny_sd()


def _write_component(folder: Path, model: torch.nn.Module, config: dict, weights_name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights_name)
    )


@pytest.fixture(scope="session")
def tiny_hub(tiny_sd, sd14_reference, tmp_path_factory) -> Path:
    """The tiny stack written as a hub folder: config.json files (published key names), safetensors,
    tokenizer."""
    root = tmp_path_factory.mktemp("tiny_hub")
    unet_cfg = dataclasses.asdict(tiny_sd.unet.cfg)
    unet_cfg["attention_head_dim"] = unet_cfg.pop("num_heads")  # the published config's name for it
    _write_component(root / "unet", tiny_sd.unet, unet_cfg, "diffusion_pytorch_model.safetensors")
    _write_component(
        root / "vae",
        tiny_sd.vae,
        dataclasses.asdict(tiny_sd.vae.cfg),
        "diffusion_pytorch_model.safetensors",
    )
    _write_component(
        root / "text_encoder",
        tiny_sd.text_encoder,
        dataclasses.asdict(tiny_sd.text_encoder.cfg),
        "model.safetensors",
    )
    shutil.copytree(sd14_reference / "hub" / "tokenizer", root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with two cores shared by other jobs, more threads
    thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def onnx_models() -> dict:
    """The tiny ONNX detector, ArcFace and landmark models of tiny_faces.py (skips without
    onnx/onnxruntime)."""
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'minid[faces]')")
    pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed (pip install 'minid[faces]')"
    )
    from tiny_faces import build_face_models

    return build_face_models()


@pytest.fixture(scope="session")
def tiny_face_pack(onnx_models, tmp_path_factory) -> Path:
    """A model root holding the tiny models as the pack `tiny_faces.PACK`
    (`<root>/models/tiny_pack/*.onnx`)."""
    from tiny_faces import write_face_pack

    root = tmp_path_factory.mktemp("face_root")
    write_face_pack(onnx_models, root)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
