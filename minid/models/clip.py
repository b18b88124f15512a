"""The CLIP ViT-L/14 text tower: 77 token ids → 77 hidden states, SD's conditioning `context`.

    ids (B, 77) → token embedding + position embedding → 12 × [pre-LN self-attention, pre-LN MLP]
                → final LayerNorm → (B, 77, 768)

Stable Diffusion uses every one of the 77 output vectors (the UNet cross-attends to all of them),
not CLIP's pooled vector at the <|endoftext|> position, and it has no projection head.

Module names equal the keys of `text_encoder/model.safetensors`
(`text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.0.self_attn.q_proj.weight`, …), so the published weights load with
`load_state_dict` and no key map. The file's `text_model.embeddings.position_ids` is not a weight
(it is `arange(77)`, which `CLIPTextEmbeddings.forward` makes) and is not in this model's state
dict: load with it removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minid.models.config import CLIPTextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702x): the sigmoid approximation of GELU that OpenAI trained CLIP with. The weights
    were fitted through this function, so it is part of the model: exact GELU would be a (slightly)
    different one."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # `hidden_act` of the config → function


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # learned, absolute
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        # Positions are always 0..T-1, so they are made here rather than kept: the published file's
        # `position_ids` is not a weight, and a buffer would be left empty by a load onto the meta
        # device.
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.num_attention_heads
        if C % H != 0:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {C} is not divisible by num_attention_heads {H}"
            )
        self.num_heads = H
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, d)
        v = self.v_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, d)
        # Causal: token i attends to tokens 0..i only. CLIP's text tower was trained with this mask
        # (the CLIP paper, Radford et al. 2021, §2.4: "masked self-attention ... to preserve the
        # ability to initialize with a pre-trained language model"), pooling at <|endoftext|>, which
        # therefore sees the whole caption. SD keeps the mask because the weights mean nothing
        # without it, and it uses all 77 states: each content token sees only the words before it,
        # and the pad positions see the prompt and the pads before them, never what follows.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d), scale 1/sqrt(d)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act is {cfg.hidden_act!r}; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """`forward(input_ids (B, 77)) -> (B, 77, hidden_size)`, the last hidden states after the final
    LayerNorm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        # The extra level gives the state-dict keys their `text_model.` prefix, as in the published
        # file.
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}"
            )
        T = input_ids.shape[1]
        if T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {T} tokens; the model has {self.cfg.max_position_embeddings} "
                "positions (tokenize with truncation to 77)"
            )
        return self.text_model(input_ids)
