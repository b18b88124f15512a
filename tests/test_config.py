"""minid.models.config: the published SD1.4 config.json files map onto the defaults without a
warning; a key minid does not know, or an option set to a value minid does not build, warns naming
it."""

from __future__ import annotations

import json
import warnings

import pytest

from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig

CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def _silent(cls, d):
    """`cls.from_dict(d)`, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.from_dict(d)


@pytest.mark.parametrize("component", sorted(CONFIGS))
def test_published_config_loads_silently_to_the_defaults(sd14_reference, component):
    cls = CONFIGS[component]
    d = json.loads((sd14_reference / "hub" / component / "config.json").read_text())
    cfg = _silent(cls, d)
    assert cfg == cls(), (
        f"SD1.4's {component}/config.json gives {cfg}, expected the defaults {cls()}"
    )


def test_configs_saved_by_current_libraries_load_silently(tmp_path):
    """diffusers and transformers write every option of their classes into config.json; at SD1.x's
    values none warns. (The tiny hub folders of the checkpoint tests are written this way.)"""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    u, v, c = UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()
    diffusers.UNet2DConditionModel(
        sample_size=u.sample_size,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.num_heads,
        cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups,
    ).save_config(tmp_path / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=v.sample_size,
    ).save_config(tmp_path / "vae")
    transformers.CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        hidden_act=c.hidden_act,
    ).save_pretrained(tmp_path / "text_encoder")
    for component, tiny in (("unet", u), ("vae", v), ("text_encoder", c)):
        d = json.loads((tmp_path / component / "config.json").read_text())
        cfg = _silent(CONFIGS[component], d)
        assert cfg == tiny, (
            f"{component}/config.json as the library wrote it gives {cfg}, expected {tiny}"
        )


def test_unknown_key_warns_naming_it_and_is_ignored(sd14_reference):
    d = json.loads((sd14_reference / "hub" / "unet" / "config.json").read_text())
    d["layers_per_blok"] = 3  # a typo of layers_per_block
    with pytest.warns(
        UserWarning, match=r"UNetConfig.*unknown keys 'layers_per_blok'.*ignored"
    ) as record:
        cfg = UNetConfig.from_dict(d)
    assert len(record) == 1, (
        f"one warning for one unknown key; got {[str(w.message) for w in record]}"
    )
    assert cfg == UNetConfig(), (
        f"the unknown key is ignored: expected the SD1.4 defaults, got {cfg}"
    )
    with pytest.warns(UserWarning, match=r"CLIPTextConfig.*unknown keys 'rope_theta'"):
        # another architecture's field
        CLIPTextConfig.from_dict({"hidden_size": 768, "rope_theta": 10000.0})


def test_option_minid_does_not_build_warns_naming_its_value():
    """SD2's UNet sets use_linear_projection; minid builds SD1.x's 1×1 convs, so it must say so."""
    with pytest.warns(
        UserWarning,
        match=r"UNetConfig.*use_linear_projection=True \(minid builds "
        r"use_linear_projection=False",
    ):
        UNetConfig.from_dict({"use_linear_projection": True, "upcast_attention": False})
    with pytest.warns(UserWarning, match=r"VAEConfig.*shift_factor=0\.1159"):
        VAEConfig.from_dict({"shift_factor": 0.1159, "latents_mean": None})
