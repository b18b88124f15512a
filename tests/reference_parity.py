"""What the parity tests of the networks share: random reference weights, loading them into minid,
comparing outputs, and checking a model's state dict against a published file's layout."""

from __future__ import annotations

import torch

REL_TOL = 1e-4  # fp32 on CPU agrees to ~1e-6 relative; this bound leaves room for other BLAS builds


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values (default init leaves norm biases at 0 and weights at
    1).

    Vectors (norm scales, biases) get N(0, 0.1²) added to 1 (norm weights) or 0; matrices and
    kernels get N(0, 1/fan_in), which keeps activations of order one through the deep network, so
    every path contributes.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.normal_(generator=g)
        if p.ndim == 1:
            p.mul_(0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            p.div_(p[0].numel() ** 0.5)
    return model


def minid_from(ref: torch.nn.Module, model_cls: type[torch.nn.Module], cfg) -> torch.nn.Module:
    """A minid model holding the reference's weights, loaded strictly by name (tensors shared, not
    copied)."""
    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def compare(name: str, ours: torch.Tensor, theirs: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    assert ours.shape == theirs.shape, (
        f"{name}: shape {tuple(ours.shape)}, expected {tuple(theirs.shape)}"
    )
    abs_err = (ours - theirs).abs().max().item()
    rel_err = abs_err / theirs.abs().max().item()
    print(f"{name}: max abs err {abs_err:.3e}, rel err {rel_err:.3e}")
    assert rel_err <= rel_tol, (
        f"{name}: relative error {rel_err:.3e} > {rel_tol} (max abs err {abs_err:.3e})"
    )


def assert_matches_layout(model: torch.nn.Module, layout: dict, file: str) -> None:
    """The model's key names and shapes equal the tensors of `file` in layouts.json's hub files."""
    published = {k: tuple(v[0]) for k, v in layout["hub_files"][file]["tensors"].items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(published) - set(ours)) == [], f"keys in {file} that minid lacks"
    assert sorted(set(ours) - set(published)) == [], f"keys minid has that {file} lacks"
    wrong = {k: (ours[k], published[k]) for k in ours if ours[k] != published[k]}
    assert wrong == {}, f"shape mismatches (minid, {file}): {wrong}"


def fullsize_pair(reference_cls, model_cls: type[torch.nn.Module], config_cls, config: dict):
    """A full-size reference built from a published config.json on `meta`, given random weights, and
    the minid model sharing those tensors: (minid model, reference)."""
    with torch.device("meta"):
        ref = reference_cls.from_config(config)
    ref = randomize_(ref.to_empty(device="cpu").eval())
    return minid_from(ref, model_cls, config_cls.from_dict(config)), ref
