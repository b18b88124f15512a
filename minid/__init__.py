"""minid: Stable Diffusion 1.4 from scratch in PyTorch, Triton attention kernels that expose and replace
attention maps, and EditedID identity restoration.

The top-level names load their modules on first use, so `import minid` stays light:

    import minid
    sd = minid.load_stable_diffusion("weights/sd-v1-4")
    result = minid.EditedID(sd).restore(original, edited, prompt_original, prompt_edited,
                                         id_words=["man"], element_words=["glasses"])
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _kernels_from_checkout() -> None:
    """Provide `minid.kernels` from a source checkout when no installation does.

    The Triton kernels live in the repository's top-level kernels/ folder, which pyproject.toml installs as
    minid.kernels, so `import kernels` never enters a user's environment. Run from the repository root
    (`python -m pytest`, `python -c`), Python finds `minid` as this folder, beside kernels/ rather than above
    it, and an installation's minid.kernels is not looked up; then the checkout's kernels/ is loaded under
    that name. Nothing is added to sys.path or to this package's __path__.
    """
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    root = Path(__file__).resolve().parent.parent
    folder = root / "kernels"
    if not ((root / "pyproject.toml").is_file() and (folder / "__init__.py").is_file()):
        return  # not a checkout: leave the import error to the caller
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_kernels_from_checkout()

# name -> module that defines it
_EXPORTS = {
    "load_stable_diffusion": "minid.checkpoint",
    "StableDiffusion": "minid.checkpoint",
    "download": "minid.weights",
    "EditedID": "minid.restore",
    "RestoreConfig": "minid.restore",
    "RestorePair": "minid.restore",
    "EditedIDConfig": "minid.editedid",
    "restore_faces": "minid.multiface",
    "calibrate": "minid.calibration",  # not minid/calibrate.py: the submodule would shadow the function
    "CalibrateConfig": "minid.calibration",
    "generate": "minid.generation",
    "CLIPTokenizer": "minid.tokenizer",
    "CLIPTextModel": "minid.clip",
    "UNet": "minid.unet",
    "VAE": "minid.vae",
    "NoiseSchedule": "minid.schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minid' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
