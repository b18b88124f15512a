"""minid.loading.checkpoint, minid.loading.keymap and minid.loading.download: every published layout
loads, names and shapes are checked, and the loaded models compute what diffusers/transformers
compute with the same weights.

Files are written with the published names, shapes and dtypes (layouts.json) and random values.
Full-size files are written once per session; variants that differ from a written one only in dtype
are proven equivalent from layouts.json instead of being written too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minid.loading import checkpoint as C
from minid.loading import download as W
from minid.loading import keymap as K
from minid.loading.files import sha256_file
from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig
from minid.models.tokenizer import CLIPTokenizer

CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}
HUB = "hub_files"


@pytest.fixture(scope="session")
def layouts(sd14_reference):
    return json.loads((sd14_reference / "layouts.json").read_text())


def meta_state(component: str, cfg=None) -> dict[str, tuple[int, ...]]:
    cfg = cfg or CONFIGS[component]()
    with torch.device("meta"):
        model = C._model_class(component)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_file(path: Path, layout: dict[str, list], dtype: torch.dtype | None = None) -> None:
    """A .safetensors file with the layout's names and shapes, random values, the layout's dtype or
    `dtype`."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}
    tensors = {}
    for name, (shape, dt) in layout.items():
        if dt == "I64":
            tensors[name] = torch.arange(shape[-1]).expand(shape).contiguous()
        else:
            tensors[name] = torch.empty(shape, dtype=dtype or dtypes[dt]).uniform_(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def assert_state_equals_file(model, path: Path, names: dict[str, str], dtype: torch.dtype) -> None:
    """Every tensor of the model's state dict equals the file's tensor `names[key]` cast to
    `dtype`."""
    state = model.state_dict()
    assert set(state) == set(names), (
        f"state dict keys differ from the key map: {set(state) ^ set(names)}"
    )
    with safe_open(str(path), framework="pt") as f:
        for key, file_key in names.items():
            want = f.get_tensor(file_key).to(dtype).reshape(state[key].shape)
            assert state[key].dtype == dtype, f"{key}: dtype {state[key].dtype}, expected {dtype}"
            assert torch.equal(state[key], want), f"{key} differs from {path.name}:{file_key}"


# --------------------------------------------------------------------------------------------------
# Names and shapes of every published file, from layouts.json (no files needed)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_key_map_covers_the_single_file_layout(layouts, component):
    """Hub names -> LDM names is a bijection onto the file's tensors of that component, shapes equal
    (the VAE attention's 1×1 convs read as Linear); the EMA names are exactly the full-EMA file's
    extra tensors."""
    expected = meta_state(component)
    single = layouts["single_file"]["tensors"]
    names = K.ldm_key_map(component, expected, CONFIGS[component]())
    prefix = K.LDM_PREFIX[component]
    in_file = {k for k in single if k.startswith(prefix)} - {prefix + C.POSITION_IDS}
    assert set(names.values()) == in_file, f"unmapped: {sorted(in_file ^ set(names.values()))[:10]}"
    for key, ldm in names.items():
        found = tuple(single[ldm][0])
        conv1x1 = component == "vae" and found == (*expected[key], 1, 1) and ".attn_1." in ldm
        assert found == expected[key] or conv1x1, (
            f"{ldm}: shape {found}, model {key} expects {expected[key]}"
        )
    rest = {k for k in single if not k.startswith(tuple(K.LDM_PREFIX.values()))}
    assert rest == set(C.LDM_SCHEDULE_BUFFERS), f"top-level tensors besides the schedule: {rest}"
    if component == "unet":
        ema = K.ldm_key_map("unet", expected, UNetConfig(), ema=True)
        extra = set(layouts["single_file_full_ema_extra"]["tensors"])
        assert set(ema.values()) == extra - C.LDM_EMA_SCALARS
        assert C.LDM_EMA_SCALARS <= extra


def test_hub_layouts_match_the_models_and_variants_differ_only_in_dtype(layouts):
    hub = layouts[HUB]
    for name, entry in hub.items():
        component = name.split("/")[0]
        renamed = {}
        for k, (shape, dt) in entry["tensors"].items():
            parts = k.split(".")
            if parts[-2] in C.OLD_VAE_ATTENTION_NAMES and "mid_block" in k:
                k = ".".join([*parts[:-2], C.OLD_VAE_ATTENTION_NAMES[parts[-2]], parts[-1]])
            renamed[k] = tuple(shape)
        renamed.pop(C.POSITION_IDS, None)
        assert renamed == meta_state(component), (
            f"{name}: names/shapes differ from minid's {component}"
        )
    # The variants not written as files below: same names and shapes as one that is, dtype aside.
    strip = lambda f: {k: v[0] for k, v in hub[f]["tensors"].items()}  # noqa: E731
    unet16 = strip("unet/diffusion_pytorch_model.fp16.safetensors")
    assert strip("unet/diffusion_pytorch_model.safetensors") == unet16
    assert strip("unet/diffusion_pytorch_model.non_ema.safetensors") == unet16
    assert strip("text_encoder/model.safetensors") == strip("text_encoder/model.fp16.safetensors")
    assert {v[1] for v in hub["unet/diffusion_pytorch_model.safetensors"]["tensors"].values()} == {
        "F32"
    }
    old = hub["vae/diffusion_pytorch_model.safetensors"]["tensors"]
    assert any(".query." in k for k in old), "the fp32 VAE file uses the old attention names"


def test_manifest_lists_every_file_the_loader_fetches(layouts, sd14_reference):
    manifest = W.load_manifest()
    assert manifest["revision"] == W.REVISION
    files = manifest["files"]
    for precision in ("fp16", "fp32"):
        assert set(W.hub_files(precision)) <= set(files)
    for name, entry in layouts[HUB].items():
        assert files[name] == {"bytes": entry["bytes"], "sha256": entry["sha256"]}, name
    for name in W.HUB_SMALL_FILES:
        assert files[name]["sha256"] == sha256_file(sd14_reference / "hub" / name), name


def test_keymap_text_lists_the_reversed_decoder():
    text = K.format_key_map()
    assert "decoder.up_blocks.0.upsamplers.0.conv" in text and "decoder.up.3.upsample.conv" in text
    assert "input_blocks.3.0.op" in text


# --------------------------------------------------------------------------------------------------
# Full-size files with random values


@pytest.fixture(scope="module")
def full_hub(layouts, sd14_reference, tmp_path_factory):
    """A hub folder: fp16 UNet, fp32 VAE (old attention names), fp16 text encoder, real configs and
    tokenizer."""
    root = tmp_path_factory.mktemp("full_hub")
    shutil.copytree(sd14_reference / "hub", root, dirs_exist_ok=True)
    for name in (
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.fp16.safetensors",
    ):
        random_file(root / name, layouts[HUB][name]["tensors"])
    return root


@pytest.mark.fullsize
def test_full_hub_folder_loads_every_tensor(full_hub):
    sd = C.load_stable_diffusion(full_hub, dtype=torch.float16)
    assert sd.tokenizer.encode("a photo")[0] == 49406
    unet_names = {k: k for k in sd.unet.state_dict()}
    assert_state_equals_file(
        sd.unet,
        full_hub / "unet/diffusion_pytorch_model.fp16.safetensors",
        unet_names,
        torch.float16,
    )
    header = C.read_header(full_hub / "vae/diffusion_pytorch_model.safetensors")
    vae_names = {k: C._hub_file_key("vae", k, header) for k in sd.vae.state_dict()}
    assert sum(k != v for k, v in vae_names.items()) == 16, "16 tensors use the old attention names"
    assert_state_equals_file(
        sd.vae, full_hub / "vae/diffusion_pytorch_model.safetensors", vae_names, torch.float16
    )
    assert_state_equals_file(
        sd.text_encoder,
        full_hub / "text_encoder/model.fp16.safetensors",
        {k: k for k in sd.text_encoder.state_dict()},
        torch.float16,
    )
    assert not list(sd.text_encoder.buffers()), "no buffers: CLIP's positions are made in forward"
    assert not any(t.is_meta for t in list(sd.text_encoder.buffers()) + list(sd.unet.parameters()))


@pytest.mark.fullsize
def test_full_single_file_loads_every_component(layouts, sd14_reference, tmp_path_factory):
    """The LDM layout, written in fp16 (names and shapes are what the mapping depends on; dtype is
    cast)."""
    path = tmp_path_factory.mktemp("full_single") / "sd-v1-4.safetensors"
    random_file(path, layouts["single_file"]["tensors"], dtype=torch.float16)
    sd = C.load_stable_diffusion(path, dtype=torch.float16, config_folder=sd14_reference / "hub")
    for component, model in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        names = K.ldm_key_map(component, model.state_dict(), CONFIGS[component]())
        assert_state_equals_file(model, path, names, torch.float16)
    path.unlink()


# --------------------------------------------------------------------------------------------------
# Tiny models: outputs equal diffusers/transformers on the same weights


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def references():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    u, v, c = UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()
    unet = diffusers.UNet2DConditionModel(
        sample_size=u.sample_size,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        down_block_types=u.down_block_types,
        up_block_types=u.up_block_types,
        attention_head_dim=u.num_heads,
        cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=v.sample_size,
    )
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    return {"unet": _randomize(unet), "vae": _randomize(vae), "text_encoder": _randomize(clip)}


def _published_clip_state(clip) -> dict[str, torch.Tensor]:
    """The text encoder's tensors as the published file names them (`text_model.` prefix, int64
    position_ids); transformers 5 saves them without the prefix."""
    state = {
        k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
        for k, v in clip.state_dict().items()
    }
    state[C.POSITION_IDS] = torch.arange(77)[None]
    return state


@pytest.fixture(scope="session")
def tiny_hub(references, sd14_reference, tmp_path_factory):
    """A tiny hub folder: config.json from diffusers/transformers; fp32 files as published (old VAE
    names, `text_model.` CLIP names) and fp16 variants with the new names."""
    root = tmp_path_factory.mktemp("tiny_hub")
    references["unet"].save_pretrained(root / "unet")
    references["vae"].save_pretrained(root / "vae")
    references["text_encoder"].save_pretrained(root / "text_encoder")
    shutil.copytree(sd14_reference / "hub" / "tokenizer", root / "tokenizer")
    vae_state = {}
    for k, t in references["vae"].state_dict().items():
        for old, new in C.OLD_VAE_ATTENTION_NAMES.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        vae_state[k] = t.contiguous()
    save_file(vae_state, str(root / "vae/diffusion_pytorch_model.safetensors"))
    save_file(
        _published_clip_state(references["text_encoder"]),
        str(root / "text_encoder/model.safetensors"),
    )
    for component, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        state = {k: v.half().contiguous() for k, v in references[component].state_dict().items()}
        # transformers-5 CLIP names
        save_file(state, str(root / component / f"{name}.fp16.safetensors"))
    return root


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([10, 700]),
        "context": torch.randn(2, 77, 32, generator=g),
        "ids": torch.randint(0, 1000, (2, 77), generator=g),
        "image": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
    }


def assert_same_outputs(references, unet=None, vae=None, text_encoder=None, tol=1e-4):
    x = _inputs()
    with torch.no_grad():
        if unet is not None:
            want = references["unet"](
                x["sample"], x["t"], encoder_hidden_states=x["context"]
            ).sample
            got = unet(x["sample"], x["t"], x["context"])
            assert (got - want).abs().max() <= tol * want.abs().max(), (
                f"UNet max err {(got - want).abs().max()}"
            )
        if vae is not None:
            want = references["vae"].encode(x["image"]).latent_dist.mean
            got = vae.encode(x["image"]).mean
            assert (got - want).abs().max() <= tol * want.abs().max(), (
                f"VAE encode err {(got - want).abs().max()}"
            )
            want = references["vae"].decode(want).sample
            got = vae.decode(got)
            assert (got - want).abs().max() <= tol * want.abs().max(), (
                f"VAE decode err {(got - want).abs().max()}"
            )
        if text_encoder is not None:
            want = references["text_encoder"](x["ids"]).last_hidden_state
            got = text_encoder(x["ids"])
            assert (got - want).abs().max() <= tol * want.abs().max(), (
                f"CLIP err {(got - want).abs().max()}"
            )


def test_tiny_hub_folder_matches_references(tiny_hub, references):
    sd = C.load_stable_diffusion(tiny_hub, dtype=torch.float32)  # fp32 files, old VAE names
    assert sd.unet.conv_in.weight.shape[0] == 32, "architecture comes from unet/config.json"
    assert_same_outputs(references, sd.unet, sd.vae, sd.text_encoder)
    for component in ("unet", "vae", "text_encoder"):
        ref = references[component].state_dict()
        got = getattr(sd, component).state_dict()
        for k, t in got.items():
            assert torch.equal(t, ref[k.removeprefix("text_model.") if k not in ref else k]), k


def test_tiny_hub_fp16_variant_is_chosen_for_fp16(tiny_hub, references):
    sd = C.load_stable_diffusion(tiny_hub, dtype=torch.float16)
    for component in ("unet", "vae", "text_encoder"):
        model = getattr(sd, component)
        ref = references[component].state_dict()
        for k, t in model.state_dict().items():
            r = ref[k] if k in ref else ref[k.removeprefix("text_model.")]
            assert t.dtype == torch.float16 and torch.equal(t, r.half()), f"{component}.{k}"
    # The fp16 file read into fp32 gives the fp16-rounded weights.
    unet = C.load_unet(tiny_hub, dtype=torch.float32, variant="fp16")
    assert torch.equal(unet.conv_in.weight, references["unet"].conv_in.weight.half().float())
    with pytest.raises(C.CheckpointError, match="non_ema"):
        C.load_unet(tiny_hub, variant="non_ema")


def _ldm_state(tiny_hub_models, with_ema: bool) -> dict[str, torch.Tensor]:
    state = {}
    for component, model in tiny_hub_models.items():
        cfg = CONFIGS[component].tiny()
        for k, t in model.state_dict().items():
            name = K.ldm_name(component, k, cfg)
            state[name] = (
                t[:, :, None, None] if ".attn_1." in name and t.ndim == 2 else t.contiguous()
            )
            if with_ema and component == "unet":
                state[K.ldm_ema_name(name)] = t.contiguous() + 1.0  # the EMA copy: different values
    state[K.LDM_PREFIX["text_encoder"] + C.POSITION_IDS] = torch.arange(77)[None]
    for name in C.LDM_SCHEDULE_BUFFERS:
        state[name] = torch.rand(1000)
    if with_ema:
        state["model_ema.decay"], state["model_ema.num_updates"] = (
            torch.tensor(0.9999),
            torch.tensor(5),
        )
    return state


@pytest.fixture(scope="session")
def tiny_single(tiny_hub, tmp_path_factory):
    sd = C.load_stable_diffusion(tiny_hub, dtype=torch.float32)
    models = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}
    root = tmp_path_factory.mktemp("tiny_single")
    save_file(_ldm_state(models, False), str(root / "sd.safetensors"))
    save_file(_ldm_state(models, True), str(root / "sd-full-ema.safetensors"))
    return root


def test_tiny_single_file_matches_diffusers_single_file_loader(tiny_single, tiny_hub, references):
    """diffusers' own LDM converter reads the same file into the same weights as minid's key map."""
    diffusers = pytest.importorskip("diffusers")
    path = tiny_single / "sd.safetensors"
    sd = C.load_stable_diffusion(path, dtype=torch.float32, config_folder=tiny_hub)
    ref_unet = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(tiny_hub), subfolder="unet", local_files_only=True
    )
    ref_vae = diffusers.AutoencoderKL.from_single_file(
        str(path), config=str(tiny_hub), subfolder="vae", local_files_only=True
    )
    refs = {
        "unet": ref_unet.eval(),
        "vae": ref_vae.eval(),
        "text_encoder": references["text_encoder"],
    }
    assert_same_outputs(refs, sd.unet, sd.vae, sd.text_encoder)


def test_full_ema_file_chooses_weights_by_ema(tiny_single, tiny_hub, references):
    path = tiny_single / "sd-full-ema.safetensors"
    ref = references["unet"].conv_in.weight
    default = C.load_unet(path, dtype=torch.float32, config_folder=tiny_hub)
    assert torch.equal(default.conv_in.weight, ref + 1.0), (
        "default for a full-EMA file: the EMA weights"
    )
    assert torch.equal(
        C.load_unet(path, torch.float32, ema=True, config_folder=tiny_hub).conv_in.weight, ref + 1
    )
    raw = C.load_unet(path, torch.float32, ema=False, config_folder=tiny_hub)
    assert_same_outputs(references, unet=raw)
    with pytest.raises(C.CheckpointError, match="no EMA copy"):
        C.load_unet(tiny_single / "sd.safetensors", ema=True, config_folder=tiny_hub)
    # The other components ignore the EMA tensors.
    assert_same_outputs(references, vae=C.load_vae(path, torch.float32, config_folder=tiny_hub))


# --------------------------------------------------------------------------------------------------
# Errors


def test_truncated_file_is_reported(tiny_hub, tmp_path):
    src = tiny_hub / "unet/diffusion_pytorch_model.safetensors"
    bad = tmp_path / "unet.safetensors"
    bad.write_bytes(src.read_bytes()[:-1000])
    with pytest.raises(C.CheckpointError, match="truncated") as e:
        C.load_unet(bad, config=UNetConfig.tiny())
    assert str(bad) in str(e.value) and "download it again" in str(e.value)


def test_wrong_missing_and_extra_tensors_in_one_error(tiny_hub, tmp_path):
    with safe_open(str(tiny_hub / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(C.CheckpointError) as e:
        C.load_unet(path, config=UNetConfig.tiny())
    msg = str(e.value)
    assert str(path) in msg and "What to do" in msg
    assert "1 missing:\n  conv_out.bias  (expected shape [4])" in msg
    assert "1 wrong shape:\n  conv_in.weight  expected [32, 4, 3, 3], found [32, 4, 1, 1]" in msg
    assert "1 unexpected:\n  extra.weight  [3]" in msg


def test_pickle_is_refused_and_points_to_convert(tmp_path):
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, ckpt)
    for call in (
        lambda: C.load_unet(ckpt),
        lambda: C.load_stable_diffusion(ckpt),
        lambda: C.read_header(ckpt),
    ):
        with pytest.raises(C.CheckpointError, match="minid convert") as e:
            call()
        assert "pickle" in str(e.value) and str(ckpt) in str(e.value)


def test_folder_with_a_file_missing(tiny_hub, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(tiny_hub, root)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (root / "vae" / name).unlink()
    with pytest.raises(C.CheckpointError, match="no vae weight file") as e:
        C.load_stable_diffusion(root, dtype=torch.float32)
    assert "minid download" in str(e.value) and "config.json" in str(e.value)
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(C.CheckpointError, match="vocab.json"):
        C.load_stable_diffusion(root, tokenizer_folder=root / "tokenizer")


def test_weights_without_a_tokenizer_get_the_copy_that_ships_with_minid(
    tiny_single, tiny_hub, tmp_path
):
    """A single file carries no tokenizer and a hub folder may lack one: both get SD1.4's, shipped
    in minid."""
    published = CLIPTokenizer.from_folder(tiny_hub / "tokenizer")
    prompt = "a photo of a man wearing eyeglasses"
    (tmp_path / "hub").mkdir()
    for source in (tiny_single / "sd.safetensors", tmp_path / "hub"):
        tokenizer = C.load_tokenizer(source)
        assert tokenizer.encode(prompt) == published.encode(prompt), (
            f"{source}: {tokenizer.tokens(prompt)[:9]}"
        )
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_hub / "tokenizer" / "vocab.json", partial)
    with pytest.raises(C.CheckpointError, match="merges.txt"):
        C.load_tokenizer(tiny_single / "sd.safetensors", tokenizer_folder=partial)


# --------------------------------------------------------------------------------------------------
# convert


def test_convert_pickle_to_safetensors(tmp_path):
    weights = {"a": torch.randn(3, 4), "b": torch.arange(5), "half": torch.randn(2).half()}
    weights["tied"] = weights["a"]  # shares storage: written as its own copy
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "global_step": 7}, src)
    summary = W.convert(src, log=lambda s: None)
    dst = tmp_path / "model.safetensors"
    assert summary.dst == dst and summary.tensors == 4
    assert summary.dtypes == {"float32": 2, "int64": 1, "float16": 1}
    assert summary.bytes == 2 * 48 + 40 + 4
    with safe_open(str(dst), "pt") as f:
        assert set(f.keys()) == set(weights)
        for k, v in weights.items():
            assert torch.equal(f.get_tensor(k), v), k
    with pytest.raises(C.CheckpointError, match="already exists"):
        W.convert(src, dst, log=lambda s: None)
    torch.save({"c": torch.ones(1)}, src)
    assert W.convert(src, dst, overwrite=True, log=lambda s: None).tensors == 1
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


# --------------------------------------------------------------------------------------------------
# download


@pytest.fixture
def remote(tmp_path):
    """A stand-in for the hub repository: every file download() asks for, with small random
    contents, and the manifest of those contents."""
    root = tmp_path / "remote"
    for name in W.hub_files("fp16"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(
            torch.randint(0, 256, (1000 + len(name),), dtype=torch.uint8).numpy().tobytes()
        )
    manifest = {
        "files": {
            n: {"bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)}
            for n in W.hub_files("fp16")
        }
    }
    return root, manifest


def fake_fetch(root: Path, calls: list):
    def fetch(repo_id, filename, revision, local_dir):
        calls.append(filename)
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / filename, out)
        return str(out)

    return fetch


def test_download_verifies_and_skips_verified_files(remote, tmp_path, monkeypatch):
    root, manifest = remote
    calls = []
    dest = W.download(
        tmp_path / "w", manifest=manifest, fetch=fake_fetch(root, calls), log=lambda s: None
    )
    assert sorted(calls) == sorted(W.hub_files("fp16"))
    assert (dest / "unet/diffusion_pytorch_model.fp16.safetensors.verified").is_file()
    # Offline, with every file present and verified: nothing is fetched, nothing is hashed again.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(W, "sha256_file", lambda p: pytest.fail("hashed a verified file again"))
    W.download(
        dest,
        manifest=manifest,
        fetch=lambda **kw: pytest.fail("fetched offline"),
        log=lambda s: None,
    )


def test_download_through_hf_hub_download(remote, tmp_path, monkeypatch):
    import huggingface_hub

    root, manifest = remote
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_fetch(root, calls))
    W.download(tmp_path / "w", manifest=manifest, log=lambda s: None)
    assert len(calls) == len(W.hub_files("fp16"))


def test_download_sha_mismatch_truncation_and_offline_missing(remote, tmp_path, monkeypatch):
    root, manifest = remote
    name = "unet/diffusion_pytorch_model.fp16.safetensors"
    dest = tmp_path / "w"
    calls = []
    W.download(dest, manifest=manifest, fetch=fake_fetch(root, calls), log=lambda s: None)
    # A truncated local file is fetched again.
    data = (dest / name).read_bytes()
    (dest / name).write_bytes(data[:100])
    calls.clear()
    W.download(dest, manifest=manifest, fetch=fake_fetch(root, calls), log=lambda s: None)
    assert calls == [name] and (dest / name).read_bytes() == data
    # The remote serves different bytes of the right size: sha256 mismatch, named in the error.
    (root / name).write_bytes(bytes(len(data)))
    (dest / name).unlink()
    with pytest.raises(C.CheckpointError, match="sha256") as e:
        W.download(dest, manifest=manifest, fetch=fake_fetch(root, []), log=lambda s: None)
    assert name in str(e.value) and "minid download" in str(e.value)
    # Offline with the file missing: the error names the file and the command to run.
    (dest / name).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(C.CheckpointError, match="HF_HUB_OFFLINE") as e:
        W.download(dest, manifest=manifest, fetch=fake_fetch(root, []), log=lambda s: None)
    assert name in str(e.value) and "--dest" in str(e.value)


def test_download_network_error_is_explained(remote, tmp_path):
    _, manifest = remote

    def no_network(**kw):
        raise ConnectionError("Name or service not known")

    with pytest.raises(
        C.CheckpointError, match="download from CompVis/stable-diffusion-v1-4 failed"
    ) as e:
        W.download(tmp_path / "w", manifest=manifest, fetch=no_network, log=lambda s: None)
    message = str(e.value)
    assert "Check the network" in message and "minid download --dest" in message
    # copying by hand: the three weight files, not the nine small ones minid has its own copies of
    weights = [n for n in W.hub_files("fp16") if n not in W.HUB_SMALL_FILES]
    assert len(weights) == 3 and all(n in message for n in weights), message
    assert "copy the 3 weight files" in message and "model_index.json" not in message


def test_weights_copied_by_hand_are_enough_without_the_small_files(remote, tmp_path, monkeypatch):
    """The network is down but the three weight files were copied in: download() verifies them,
    notes the small files it could not fetch, and the loaders use minid's SD1.4 configs and
    tokenizer instead."""
    from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig

    root, manifest = remote
    dest = tmp_path / "w"
    weights = [n for n in W.hub_files("fp16") if n not in W.HUB_SMALL_FILES]
    for name in weights:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, dest / name)

    def no_network(**kw):
        raise ConnectionError("Name or service not known")

    for offline in ("0", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        logged: list[str] = []
        W.download(dest, manifest=manifest, fetch=no_network, log=logged.append)
        note = [line for line in logged if line.startswith("note:")]
        assert len(note) == 1 and "9 small file(s)" in note[0] and "its own SD1.4" in note[0]
    for component, cls in (
        ("unet", UNetConfig),
        ("vae", VAEConfig),
        ("text_encoder", CLIPTextConfig),
    ):
        file, config = C._resolve(component, dest, None, torch.float16, None, None, None)
        assert (
            file == dest / next(n for n in weights if n.startswith(component)) and config == cls()
        )
    assert C.load_tokenizer(dest).encode("a photo")[0] == 49406
