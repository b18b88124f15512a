"""minid's CLIP text encoder against transformers' CLIPTextModel with the same random weights (fp32,
CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minid.models.clip import CLIPTextModel
from minid.models.config import CLIPTextConfig
from minid.models.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")


def reference_model(cfg: CLIPTextConfig):
    """transformers' CLIPTextModel with the architecture of `cfg`, its weights perturbed away from
    the initialisation (so LayerNorm scales and biases are not 1 and 0), in eval mode."""
    fields = dataclasses.asdict(cfg)
    # bos/eos only choose transformers' pooled output, which SD does not use; ids inside any
    # vocabulary.
    config = transformers.CLIPTextConfig(
        **fields, bos_token_id=0, eos_token_id=2, attn_implementation="eager"
    )
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def load_reference_weights(model: CLIPTextModel, reference) -> None:
    """Copy the reference's weights. transformers 5 names them without the `text_model.` prefix that
    the published file (and minid) use; older versions include it."""
    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in reference.state_dict().items()
        if not k.endswith("position_ids")
    }
    model.load_state_dict(state, strict=True)


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|)."""
    max_abs = (ours - ref).abs().max().item()
    return max_abs, max_abs / ref.abs().max().item()


@settings(max_examples=15, deadline=None, derandomize=True)  # fixed examples: no CI flakes
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 77),
    layers=st.integers(1, 3),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([4, 8, 16]),
    act=st.sampled_from(["quick_gelu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_tiny_matches_transformers(batch, tokens, layers, heads, head_dim, act, seed):
    torch.manual_seed(seed)
    width = heads * head_dim
    cfg = dataclasses.replace(
        CLIPTextConfig.tiny(),
        vocab_size=100,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
    )
    reference = reference_model(cfg)
    model = CLIPTextModel(cfg).eval()
    load_reference_weights(model, reference)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens))
    with torch.no_grad():
        ours = model(ids)
        ref = reference(input_ids=ids).last_hidden_state
    assert ours.shape == (batch, tokens, width), f"shape {tuple(ours.shape)}"
    max_abs, rel = errors(ours, ref)
    print(
        f"CLIP tiny (B={batch}, T={tokens}, layers={layers}, heads={heads}×{head_dim}, {act}): "
        f"max abs error {max_abs:.2e}, relative {rel:.2e}"
    )
    assert rel < 1e-5, (
        f"max abs error {max_abs:.2e}, relative {rel:.2e} (cfg {cfg}, ids {tuple(ids.shape)})"
    )


def test_causal():
    """Changing token j changes the outputs at positions ≥ j only."""
    model = CLIPTextModel(CLIPTextConfig.tiny()).eval()
    ids = torch.randint(0, 1000, (1, 77))
    changed = ids.clone()
    changed[0, 40] = (ids[0, 40] + 1) % 1000
    with torch.no_grad():
        diff = (model(ids) - model(changed)).abs().amax(dim=-1)[0]  # (77,)
    assert diff[:40].max() == 0, f"positions before 40 changed by up to {diff[:40].max():.2e}"
    assert diff[40:].min() > 0, "every position from 40 on should see the change"


def test_rejects_too_many_tokens():
    model = CLIPTextModel(CLIPTextConfig.tiny())
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))


def test_state_dict_matches_published_layout(sd14_reference):
    """Key names and shapes equal the text_model tensors of text_encoder/model.safetensors, less
    position_ids."""
    layouts = json.loads((sd14_reference / "layouts.json").read_text())
    published = layouts["hub_files"]["text_encoder/model.safetensors"]["tensors"]
    expected = {
        k: tuple(shape)
        for k, (shape, _dtype) in published.items()
        if k.startswith("text_model.") and k != "text_model.embeddings.position_ids"
    }
    cfg = CLIPTextConfig.from_dict(
        json.loads((sd14_reference / "hub/text_encoder/config.json").read_text())
    )
    assert cfg == CLIPTextConfig(), (
        f"the published config should give the SD1.4 defaults, got {cfg}"
    )
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(expected), (
        f"missing {sorted(set(expected) - set(ours))}, extra {sorted(set(ours) - set(expected))}"
    )
    wrong = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert not wrong, f"shapes differ (ours, published): {wrong}"


@pytest.mark.fullsize
def test_sd14_matches_transformers_on_real_prompts(sd14_reference):
    """Full SD1.4 text encoder, random weights, prompts tokenised with the real vocabulary."""
    hub = sd14_reference / "hub"
    cfg = CLIPTextConfig.from_dict(json.loads((hub / "text_encoder/config.json").read_text()))
    tok = CLIPTokenizer.from_folder(hub / "tokenizer")
    prompts = [
        "a photo of a man wearing black glasses",
        "a photo of a man",
        "",
        "A close-up portrait of an old woman with sunglasses, smiling, 8k, highly detailed " * 4,
    ]
    ids = tok(prompts)  # (4, 77); the last one truncated
    reference = reference_model(cfg)
    model = CLIPTextModel(cfg).eval()
    load_reference_weights(model, reference)
    with torch.no_grad():
        ours = model(ids)
        ref = reference(input_ids=ids).last_hidden_state
    assert ours.shape == (4, 77, 768), f"shape {tuple(ours.shape)}"
    max_abs, rel = errors(ours, ref)
    print(f"\nCLIP SD1.4 fp32 CPU vs transformers: max abs error {max_abs:.3e}, relative {rel:.3e}")
    assert rel < 1e-5, f"max abs error {max_abs:.2e}, relative {rel:.2e}"
