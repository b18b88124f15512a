"""minid: Stable Diffusion 1.4 from scratch in PyTorch, Triton attention kernels that expose and
replace attention maps, and EditedID identity restoration.

The top-level names load their modules on first use, so `import minid` stays light:

    import minid
    sd = minid.load_stable_diffusion("weights/sd-v1-4")
    result = minid.EditedID(sd).restore(original, edited, prompt_original, prompt_edited,
                                         id_words=["man"], element_words=["glasses"])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


# name -> module that defines it
_EXPORTS = {
    "load_stable_diffusion": "minid.loading.checkpoint",
    "StableDiffusion": "minid.loading.checkpoint",
    "download": "minid.loading.download",
    "EditedID": "minid.restore.pipeline",
    "RestoreConfig": "minid.restore.config",
    "RestorePair": "minid.restore.inputs",
    "EditedIDConfig": "minid.method.editedid",
    "restore_faces": "minid.restore.multiface",
    "calibrate": "minid.dataset.job",
    "CalibrateConfig": "minid.dataset.job",
    "generate": "minid.sampling.text_to_image",
    "CLIPTokenizer": "minid.models.tokenizer",
    "CLIPTextModel": "minid.models.clip",
    "UNet": "minid.models.unet",
    "VAE": "minid.models.vae",
    "NoiseSchedule": "minid.sampling.schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minid' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
