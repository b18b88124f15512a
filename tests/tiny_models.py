"""The tests' tiny random Stable Diffusion stack (minid.loading.tiny, the one `minid demo --tiny`
runs) and smooth random pictures at its size.

Use the session-scoped `tiny_sd` fixture of conftest.py, or `build_tiny_sd(seed)` for a stack of
your own.
"""

from __future__ import annotations

import torch

from minid.loading.tiny import IMAGE_SIZE, build_tiny_sd, tiny_configs

__all__ = ["IMAGE_SIZE", "build_tiny_sd", "random_image", "tiny_configs"]


def random_image(seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A smooth random picture (1, 3, size, size) in [-1, 1]: low-frequency noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )
