"""EditedID end to end on the tiny random stack: exact properties of the gating, blending,
ablations, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import IMAGE_SIZE, random_image

from minid.imaging.images import load_image, save_image
from minid.method import editedid
from minid.method.control import AttentionStore
from minid.method.editedid import Disentanglement, EditedIDConfig, Tokens
from minid.method.gating import GatingConfig
from minid.method.null_text import NullTextConfig
from minid.restore.config import RestoreConfig
from minid.restore.pipeline import EditedID
from minid.sampling.guided import invert
from minid.sampling.hybrid import HybridSchedule
from minid.sampling.plans import DDIM, ddim_plan
from minid.sampling.schedule import NoiseSchedule
from minid.sampling.text_to_image import generate

pytestmark = pytest.mark.usefixtures("one_thread")

P_O = "a photo of a man"
P_E = "a photo of a man wearing black glasses"
METHOD = EditedIDConfig(null_text=NullTextConfig(inner_steps=2))  # few null-text updates
LATENT = IMAGE_SIZE // 8
PLAN = METHOD.plan(NoiseSchedule.scaled_linear())


def fast(method: EditedIDConfig = METHOD, **image_side) -> RestoreConfig:
    """The restore config of these tests: tiny images, few null-text updates."""
    return RestoreConfig(method, image_size=IMAGE_SIZE, **image_side)


def _entangle(sd, d, c_o, c_e, mask_o, mask_e, tokens, method=METHOD, plan=PLAN, backend="auto"):
    return editedid.entangle(
        sd.unet, plan, method, d, c_o, c_e, mask_o, mask_e, [tokens], backend=backend
    )


def _stage3_inputs(sd, seed=0):
    """Random start latents and per-step null embeddings: Stage 3 alone, without running Stages
    1-2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ctx = sd.text_encoder(sd.tokenizer(["", P_O, P_E]))
    nulls_o = [ctx[0:1] + 0.1 * torch.randn(ctx[0:1].shape, generator=g) for _ in range(6)]
    nulls_e = [ctx[0:1] + 0.1 * torch.randn(ctx[0:1].shape, generator=g) for _ in range(6)]
    z_T = torch.randn(1, 4, LATENT, LATENT, generator=g)
    d = Disentanglement(
        null_o=nulls_o,
        null_e=nulls_e,
        z_T_o=z_T,
        z_T_e=z_T.clone(),
        z0=torch.zeros(2, 4, 8, 8),
        store=AttentionStore(),
        steps=[],
    )
    return d, ctx[1:2], ctx[2:3]


def _id_pairs(sd, prompt_t):
    pos_o, pos_t = sd.tokenizer.align_tokens(P_O, prompt_t, "man")
    return list(zip(pos_t, pos_o))


def _glasses_pairs(sd):
    return list(zip(*sd.tokenizer.align_tokens(P_E, P_E, "glasses")))


@pytest.mark.parametrize("mode", ["output", "map"])
def test_full_face_mask_with_identity_words_and_o_as_target_reproduces_o(tiny_sd, mode):
    method = replace(METHOD, target="original", gating=GatingConfig(mode=mode))
    d, c_o, c_e = _stage3_inputs(tiny_sd)
    full, empty = torch.ones(1, 1, LATENT, LATENT), torch.zeros(1, 1, LATENT, LATENT)
    z = _entangle(tiny_sd, d, c_o, c_e, full, empty, Tokens(_id_pairs(tiny_sd, P_O)), method)
    err = (z[2] - z[0]).abs().max().item()
    scale = z[0].abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), (
        f"branch T differs from branch O by {err} (|z| up to {scale})"
    )
    assert (z[1] - z[0]).abs().max().item() > 1e-2, (
        "O and E should differ (different null-texts and prompts)"
    )


def test_empty_masks_and_no_tokens_reproduce_e_exactly(tiny_sd):
    d, c_o, c_e = _stage3_inputs(tiny_sd, seed=1)
    empty = torch.zeros(1, 1, LATENT, LATENT)
    z = _entangle(tiny_sd, d, c_o, c_e, empty, empty, Tokens(), replace(METHOD, blend=False))
    assert torch.equal(z[2], z[1]), f"T differs from E by {(z[2] - z[1]).abs().max().item()}"


def test_blending_keeps_e_outside_the_dilated_mask_union_exactly(tiny_sd):
    d, c_o, c_e = _stage3_inputs(tiny_sd, seed=2)
    d.z_T_e = d.z_T_o + 0.5  # different starts: without blending T would differ from E everywhere
    mask_o = torch.zeros(1, 1, LATENT, LATENT)
    mask_o[..., 1:3, 1:3] = 1
    mask_e = torch.zeros(1, 1, LATENT, LATENT)
    mask_e[..., 5:6, 5:7] = 1
    z = _entangle(
        tiny_sd,
        d,
        c_o,
        c_e,
        mask_o,
        mask_e,
        Tokens(_id_pairs(tiny_sd, P_E), _glasses_pairs(tiny_sd)),
        replace(METHOD, blend_dilation=1),
    )
    m = editedid.blend_mask(mask_o, mask_e, LATENT, 1)[0, 0].bool()  # (h, w)
    assert 0 < int(m.sum()) < m.numel()
    assert bool(m[0:4, 0:4].all()) and not bool(m[7, 0]), "the union is dilated by one latent pixel"
    outside = ~m
    assert torch.equal(z[2][:, outside], z[1][:, outside]), (
        "outside the mask T must equal E exactly"
    )
    assert not torch.equal(z[2][:, m], z[1][:, m]), "inside the mask T should differ from E"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = {}
    for name, seed in (("original", 11), ("edited", 12)):
        paths[name] = save_image(random_image(seed), folder / f"{name}.png")
    return paths


@pytest.fixture(scope="module")
def full_result(tiny_sd, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("restored")
    pipe = EditedID(tiny_sd, fast())
    result = pipe.restore(
        inputs["original"],
        inputs["edited"],
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        seed=0,
        progress=False,
        save_intermediates=out,
    )
    return result, out


def test_restore_returns_everything_and_saves_intermediates(full_result):
    result, out = full_result
    assert result.image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(result.image).all() and result.image.abs().max() <= 1
    assert set(result.psnr) == {"original", "edited"} and all(v == v for v in result.psnr.values())
    assert set(result.timings) >= {"encode", "align", "disentangle", "entangle", "decode"}
    assert result.w_schedule[0] == 0.04 and result.w_schedule[-1] == 0.5
    assert len(result.null_text) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["w_schedule"] == result.w_schedule
    for name in (
        "restored",
        "reconstruction_original",
        "reconstruction_edited",
        "mask_face",
        "mask_element",
        "w_schedule_plot",
        "attention_grid",
    ):
        assert result.paths[name].is_file(), f"{name} was not written"
    assert any("cross-attention" in n for n in result.notes), "masks from attention must be noted"
    assert set(result.attention_maps) == {"man", "glasses"}
    for word, m in result.attention_maps.items():
        assert (
            m.shape == (LATENT, LATENT) and abs(float(m.max()) - 1) < 1e-6 and float(m.min()) < 1
        ), (
            f"the attention map of {word!r} is not a normalised map (range "
            f"{float(m.min())}..{float(m.max())})"
        )


def test_same_seed_same_output_and_the_seed_matters_when_sampling(tiny_sd, inputs, full_result):
    pipe = EditedID(tiny_sd, fast())
    again = pipe.restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], seed=0, progress=False
    )
    assert torch.equal(again.image, full_result[0].image), (
        "the same inputs and seed gave another image"
    )
    sampled = EditedID(tiny_sd, fast(sample_posterior=True))
    a = sampled.restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], seed=1, progress=False
    )
    b = sampled.restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], seed=1, progress=False
    )
    c = sampled.restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], seed=2, progress=False
    )
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image), (
        "a posterior sample with another seed gave the same image"
    )


def _masks():
    face = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    face[8:40, 8:40] = 1
    glasses = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    glasses[16:24, 8:56] = 1
    return face, glasses


def _restore_with_masks(sd, inputs, ablation):
    face, glasses = _masks()
    pipe = EditedID(sd, fast(replace(METHOD, ablation=ablation)))
    return pipe.restore(
        inputs["original"],
        inputs["edited"],
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        face_mask=face,
        element_mask=glasses,
        progress=False,
    )


@pytest.fixture(scope="module")
def full_method_with_masks(tiny_sd, inputs):
    return _restore_with_masks(tiny_sd, inputs, "none")


@pytest.mark.parametrize(
    "ablation", ["baseline", "no_alignment", "no_disentanglement", "no_entanglement"]
)
def test_each_ablation_changes_the_result(tiny_sd, inputs, full_method_with_masks, ablation):
    ablated = _restore_with_masks(tiny_sd, inputs, ablation)
    diff = (ablated.image - full_method_with_masks.image).abs().max().item()
    assert diff > 1e-4, f"ablation {ablation} left the result unchanged (max difference {diff})"
    if ablation in ("baseline", "no_alignment"):
        assert ablated.w_schedule == [0.0] * 6, "without alignment nothing is mixed"
    else:
        assert ablated.w_schedule[-1] == 0.5


def test_without_alignment_each_start_latent_is_its_own_inversion(tiny_sd):
    method = replace(METHOD, ablation="no_alignment")
    with torch.no_grad():
        z0 = tiny_sd.vae.encode_latent(torch.cat([random_image(1), random_image(2)]))
        ctx = tiny_sd.text_encoder(tiny_sd.tokenizer([P_O, P_E]))
    res = editedid.align(tiny_sd.unet, PLAN, method, z0[0:1], z0[1:2], ctx[0:1], ctx[1:2])
    assert res.w_schedules == [[0.0] * 6], "without alignment nothing is mixed"
    for k, pivots in enumerate((res.pivots_o, res.pivots_e)):
        alone = invert(tiny_sd.unet, PLAN, z0[k : k + 1], ctx[k : k + 1])
        err = max((a - b).abs().max().item() for a, b in zip(pivots, alone))
        assert err < 1e-5, f"image {k}: the ablated pivots differ from its own inversion by {err}"


def test_without_disentanglement_every_step_is_ddim():
    schedule = NoiseSchedule.scaled_linear()
    for ablation in ("no_disentanglement", "baseline"):
        plan = replace(METHOD, ablation=ablation).plan(schedule)
        assert plan == ddim_plan(schedule, 6), f"{ablation}: the plan must be DDIM's alone"
        assert {s.solver for s in plan.steps} == {DDIM}
    assert [s.solver for s in PLAN.steps][-2:] == ["dpm_solver++"] * 2, (
        "the full method keeps the hybrid"
    )


def test_without_entanglement_no_self_attention_row_is_replaced(tiny_sd):
    d, c_o, c_e = _stage3_inputs(tiny_sd, seed=5)
    full = torch.ones(1, 1, LATENT, LATENT)
    ablated = _entangle(
        tiny_sd, d, c_o, c_e, full, full, Tokens(), replace(METHOD, ablation="no_entanglement")
    )
    assert torch.equal(ablated[2], ablated[1]), (
        "without gating and without tokens, T must equal E exactly"
    )
    gated = _entangle(tiny_sd, d, c_o, c_e, full, full, Tokens())
    assert not torch.equal(gated[2], gated[1]), (
        "the full method's gating must change T under the same masks"
    )


def test_the_baseline_runs_t_from_the_originals_z_T_with_e_s_prompt_and_o_s_null_text(tiny_sd):
    from minid.sampling.guided import reconstruct

    method = replace(METHOD, ablation="baseline")  # the baseline itself turns blending off
    plan = method.plan(NoiseSchedule.scaled_linear())
    d, c_o, c_e = _stage3_inputs(tiny_sd, seed=6)
    d.z_T_e = d.z_T_o + 0.5  # two separate inversions end apart
    full = torch.ones(1, 1, LATENT, LATENT)
    z = _entangle(tiny_sd, d, c_o, c_e, full, full, Tokens(), method, plan)
    alone = reconstruct(tiny_sd.unet, plan, d.z_T_o, c_e, d.null_o, method.guidance)[-1]
    err = (z[2:3] - alone).abs().max().item()
    assert err < 1e-4, (
        f"baseline T differs from E's prompt with O's null-texts run from z_T^O by {err}"
    )


def _stages_1_2(sd, method, seed=7):
    """Stages 1-2 of `method` on two random images: the alignment, the disentanglement and the
    embeddings."""
    with torch.no_grad():
        z0 = sd.vae.encode_latent(torch.cat([random_image(seed), random_image(seed + 1)]))
        ctx = sd.text_encoder(sd.tokenizer(["", P_O, P_E]))
    plan = method.plan(NoiseSchedule.scaled_linear())
    a = editedid.align(sd.unet, plan, method, z0[0:1], z0[1:2], ctx[1:2], ctx[2:3])
    d = editedid.disentangle(sd.unet, plan, method, a, ctx[1:2], ctx[2:3], ctx[0:1])
    return a, d, ctx[1:2], ctx[2:3], plan


def test_direct_inversion_puts_o_and_e_exactly_on_their_pivots(tiny_sd):
    method = replace(METHOD, inversion="direct")
    a, d, c_o, c_e, plan = _stages_1_2(tiny_sd, method)
    assert d.steps == [] and torch.equal(d.z0, torch.cat([a.pivots_o[0], a.pivots_e[0]])), (
        "direct inversion optimises nothing; its reconstructions are the pivots"
    )
    face = torch.zeros(1, 1, LATENT, LATENT)
    face[..., 2:6, 2:6] = 1
    z = editedid.entangle(
        tiny_sd.unet,
        plan,
        method,
        d,
        c_o,
        c_e,
        face,
        torch.zeros_like(face),
        [Tokens(_id_pairs(tiny_sd, P_E), _glasses_pairs(tiny_sd))],
    )
    assert torch.equal(z[0:1], a.pivots_o[0]) and torch.equal(z[1:2], a.pivots_e[0]), (
        "Stage 3's O and E branches must end on their pivots z_0 bit for bit"
    )
    m = editedid.blend_mask(face, torch.zeros_like(face), LATENT, METHOD.blend_dilation)[
        0, 0
    ].bool()
    assert torch.equal(z[2][:, ~m], z[1][:, ~m]), "outside the mask T must equal E exactly"
    assert not torch.equal(z[2][:, m], z[1][:, m]), "inside the mask the gating must have changed T"
    empty = torch.zeros_like(face)
    z = editedid.entangle(
        tiny_sd.unet, plan, replace(method, blend=False), d, c_o, c_e, empty, empty, [Tokens()]
    )
    assert torch.equal(z[2], z[1]), (
        "empty masks and no tokens: T must equal E exactly under direct inversion"
    )


def test_negative_prompt_inversion_optimises_nothing_and_restores(tiny_sd, inputs):
    pipe = EditedID(tiny_sd, fast(replace(METHOD, inversion="negative-prompt")))
    result = pipe.restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], progress=False
    )
    assert result.inversion == "negative-prompt" and result.null_text == []
    assert result.unet_calls["disentangle"] == {"forward": 6, "backward": 0}, result.unet_calls
    assert bool(torch.isfinite(result.image).all()) and all(v == v for v in result.psnr.values())


def test_the_report_counts_each_stages_unet_calls(tiny_sd, inputs, full_result):
    direct = EditedID(tiny_sd, fast(replace(METHOD, inversion="direct"))).restore(
        inputs["original"], inputs["edited"], P_O, P_E, ["man"], ["glasses"], progress=False
    )
    null_text = full_result[0]
    n = 6
    for result in (direct, null_text):
        assert result.unet_calls["align"] == {"forward": n, "backward": 0}, (
            "Stage 1: one batched call per step"
        )
        assert result.unet_calls["entangle"] == {"forward": n, "backward": 0}, (
            "Stage 3: one batched call per step"
        )
    assert direct.unet_calls["disentangle"] == {"forward": n, "backward": 0}, direct.unet_calls
    # over O and E: one batch per iteration
    updates = sum(sum(s.iterations) for s in null_text.null_text)
    calls = null_text.unet_calls["disentangle"]
    assert (
        calls["backward"] >= max(max(s.iterations) for s in null_text.null_text)
        and calls["backward"] > 0
    )
    assert calls["forward"] > direct.unet_calls["disentangle"]["forward"], (
        "null-text makes more UNet calls"
    )
    assert updates > 0
    summary = json.loads((full_result[1] / "summary.json").read_text())
    assert summary["inversion"] == "null-text" and summary["unet_calls"] == null_text.unet_calls


def test_bad_inputs_fail_early_with_clear_errors(tiny_sd, inputs):
    pipe = EditedID(tiny_sd, fast())
    calls = []
    original_forward = tiny_sd.unet.forward
    tiny_sd.unet.forward = lambda *a, **k: calls.append(1) or original_forward(*a, **k)
    try:
        args = (inputs["original"], inputs["edited"], P_O, P_E)
        with pytest.raises(ValueError, match="'woman' is not in the prompt"):
            pipe.restore(*args, ["woman"], ["glasses"], progress=False)
        with pytest.raises(ValueError, match="'hat' is not in the prompt"):
            pipe.restore(*args, ["man"], ["hat"], progress=False)
        with pytest.raises(ValueError, match="empty"):
            pipe.restore(
                *args,
                ["man"],
                ["glasses"],
                face_mask=torch.zeros(IMAGE_SIZE, IMAGE_SIZE),
                progress=False,
            )
        with pytest.raises(ValueError, match=r"\(1, 3, 64, 64\)"):
            pipe.restore(
                torch.zeros(1, 3, 32, 32),
                inputs["edited"],
                P_O,
                P_E,
                ["man"],
                ["glasses"],
                progress=False,
            )
        with pytest.raises(ValueError, match="non-empty"):
            pipe.restore(
                inputs["original"], inputs["edited"], "", P_E, ["man"], ["glasses"], progress=False
            )
        with pytest.raises(ValueError, match="at least one identity word"):
            pipe.restore(*args, [], ["glasses"], progress=False)
        with pytest.raises(FileNotFoundError, match="not found"):
            pipe.restore(
                "/nonexistent/original.png",
                inputs["edited"],
                P_O,
                P_E,
                ["man"],
                ["glasses"],
                progress=False,
            )
        with pytest.raises(ValueError, match="ablation"):
            EditedIDConfig(ablation="no_everything")
        assert calls == [], "the UNet ran before the inputs were checked"
    finally:
        tiny_sd.unet.forward = original_forward


def test_wrong_mask_size_is_resized_with_a_note(tiny_sd, inputs):
    pipe = EditedID(tiny_sd, fast(EditedIDConfig(null_text=NullTextConfig(inner_steps=0))))
    small = torch.zeros(16, 16)
    small[4:12, 4:12] = 1
    with pytest.warns(UserWarning, match="resized"):
        result = pipe.restore(
            inputs["original"],
            inputs["edited"],
            P_O,
            P_E,
            ["man"],
            ["glasses"],
            face_mask=small,
            progress=False,
        )
    assert any("resized" in n for n in result.notes)
    assert result.masks["face"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def test_outputs_never_overwrite_an_input(tiny_sd, inputs, tmp_path):
    x, _ = load_image(inputs["original"], size=IMAGE_SIZE)
    with pytest.raises(FileExistsError, match="input image"):
        save_image(x, inputs["original"], inputs=[inputs["original"]])


def test_generate_is_deterministic_per_seed(tiny_sd):
    a = generate(tiny_sd, P_O, num_steps=3, seed=5, size=IMAGE_SIZE)
    b = generate(tiny_sd, P_O, num_steps=3, seed=5, size=IMAGE_SIZE)
    c = generate(tiny_sd, P_O, num_steps=3, seed=6, size=IMAGE_SIZE, solver="dpm")
    assert a.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_demo_writes_original_edited_restored_and_the_diagnostics(tiny_sd, tmp_path):
    from minid.app.demo import demo

    paths = demo(
        tiny_sd, tmp_path / "demo", size=IMAGE_SIZE, generate_steps=4, config=fast(), progress=False
    )
    for name in (
        "original",
        "edited",
        "restored",
        "comparison",
        "mask_face",
        "mask_element",
        "w_schedule_plot",
        "summary",
        "attention_grid",
    ):
        assert paths[name].is_file(), f"demo did not write {name}"
    original, _ = load_image(paths["original"], size=IMAGE_SIZE)
    edited, _ = load_image(paths["edited"], size=IMAGE_SIZE)
    assert not torch.equal(original, edited), "the edit changed nothing"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_load_image_any_mode_and_size_and_paste_back(tmp_path, mode):
    from PIL import Image

    from minid.imaging.crops import paste_back

    g = torch.Generator().manual_seed(0)
    # a 100×60 landscape picture
    rgb = (torch.rand(60, 100, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype("uint16") * 200)  # 16-bit grey
    elif mode != "RGB":
        img = img.convert(mode)
    path = tmp_path / f"in_{mode.replace(';', '')}.png"
    img.save(path)
    x, frame = load_image(path, size=32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert frame.original_size == (100, 60) and frame.box == (20, 0, 80, 60), (
        "the crop is the centred square"
    )
    from minid.imaging.images import pil_to_tensor, to_rgb

    before = pil_to_tensor(to_rgb(Image.open(path)))
    # the negative: every pixel changes
    back = paste_back(before, -x, frame.affine, mask=torch.ones(32, 32))
    assert back.shape == (1, 3, 60, 100)
    assert torch.equal(back[..., :20], before[..., :20]) and torch.equal(
        back[..., 80:], before[..., 80:]
    ), "paste_back changed pixels outside the crop"
    inside = (back[..., 20:80] - before[..., 20:80]).abs().amax(dim=(1, 2)).min()
    assert float(inside) > 0, "paste_back left a column of the crop unchanged"


def test_a_mask_file_of_another_size_is_resized_with_a_note(tiny_sd, inputs, tmp_path):
    from PIL import Image

    mask = Image.new("L", (2 * IMAGE_SIZE, 2 * IMAGE_SIZE), 0)
    mask.paste(255, (16, 16, 80, 80))
    mask.save(tmp_path / "face.png")
    pipe = EditedID(tiny_sd, fast(EditedIDConfig(null_text=NullTextConfig(inner_steps=0))))
    with pytest.warns(UserWarning, match="resized"):
        result = pipe.restore(
            inputs["original"],
            inputs["edited"],
            P_O,
            P_E,
            ["man"],
            ["glasses"],
            face_mask=tmp_path / "face.png",
            progress=False,
        )
    assert any("resized" in n for n in result.notes)
    m = result.masks["face"][0, 0]
    assert m[20, 20] > 0.9 and m[50, 50] < 0.1, "the resized mask is not where the file put it"


def test_save_restored_pastes_the_square_back_into_the_edited_photo(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from minid.imaging.images import check_output_path, save_restored

    Image.new("RGB", (100, 60), (0, 0, 0)).save(tmp_path / "edited.png")
    result = SimpleNamespace(image=torch.ones(1, 3, 32, 32))  # a white square
    path = save_restored(
        result,
        tmp_path / "restored.png",
        original=tmp_path / "edited.png",
        inputs=[tmp_path / "edited.png"],
    )
    import numpy as np

    out = np.asarray(Image.open(path))
    assert out.shape == (60, 100, 3), "the output has the edited photo's size"
    assert out[:, :20].max() == 0 and out[:, 80:].max() == 0 and out[:, 20:80].min() == 255
    with pytest.raises(FileExistsError, match="input image"):
        check_output_path(tmp_path / "edited.png", [tmp_path / "edited.png"])
    with pytest.raises(ValueError, match="must end in"):
        check_output_path(tmp_path / "restored.tiff")


def test_triton_kernels_and_the_pytorch_path_give_the_same_stage3_result(tiny_sd):
    """Stage 3 through the Triton kernels (Triton's interpreter on CPU) equals the PyTorch path."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    mask_o = torch.zeros(1, 1, LATENT, LATENT)
    mask_o[..., 1:5, 2:6] = 1
    mask_e = torch.zeros(1, 1, LATENT, LATENT)
    mask_e[..., 3:7, 1:4] = 1  # overlaps M_O: the λ-weighted rows are exercised too
    results = {}
    method = replace(METHOD, solver=HybridSchedule(num_steps=3, dpm_start=3, dpm_end=3))
    for backend in ("torch", "triton"):
        d, c_o, c_e = _stage3_inputs(tiny_sd, seed=4)
        d.null_o, d.null_e = d.null_o[:3], d.null_e[:3]
        results[backend] = _entangle(
            tiny_sd,
            d,
            c_o,
            c_e,
            mask_o,
            mask_e,
            Tokens(_id_pairs(tiny_sd, P_E), _glasses_pairs(tiny_sd)),
            method,
            method.plan(NoiseSchedule.scaled_linear()),
            backend,
        )
    err = (results["triton"] - results["torch"]).abs().max().item()
    scale = results["torch"].abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), (
        f"Triton vs PyTorch path: max diff {err} (|z| up to {scale})"
    )
    print(f"Triton vs PyTorch path, Stage 3 latents: max abs diff {err:.2e}")
    assert not torch.equal(results["torch"][2], results["torch"][1]), (
        "the gating must have changed T"
    )


@pytest.mark.parametrize("inversion", ["direct", "null-text"])
def test_the_demo_estimate_counts_the_unet_images_it_runs(tiny_sd, tmp_path, inversion):
    from minid.app.demo import demo, demo_settings, demo_unet_images

    method = replace(METHOD, inversion=inversion)
    images_seen = []

    def count(module, args, output):
        images_seen.append(args[0].shape[0] * (3 if output.requires_grad else 1))

    hook = tiny_sd.unet.register_forward_hook(count)
    try:
        demo(
            tiny_sd,
            tmp_path / "demo",
            size=IMAGE_SIZE,
            generate_steps=4,
            config=fast(method),
            progress=False,
        )
    finally:
        hook.remove()
    estimate = sum(demo_unet_images(4, method).values())
    if inversion == "direct":
        assert sum(images_seen) == estimate, (
            f"counted {sum(images_seen)} UNet images, estimated {estimate}"
        )
    else:  # null-text is estimated at its most; early stops make it cheaper
        assert sum(images_seen) <= estimate, (
            f"counted {sum(images_seen)} UNet images, estimated at most {estimate}"
        )
    assert demo_settings("cpu", METHOD) == (10, replace(METHOD, inversion="direct")), (
        "a CPU takes the fast path"
    )
    assert demo_settings("cuda:0", METHOD) == (20, METHOD) and demo_settings(
        "cpu", METHOD, True
    ) == (20, METHOD)
