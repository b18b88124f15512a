"""`minid profile` (minid/app/profile.py) on the CPU: the tiny UNet's step under torch.profiler. Its
FLOP counts equal the analytic count of each attention site, its table sums to the step measured in
the same profiled run, and the Chrome trace names the sites and the ops."""

from __future__ import annotations

import json

import pytest
import torch
from minid.kernels.accounting import OpCall

from minid.app import cli
from minid.app.profile import profile_unet
from minid.app.profile_report import PEAKS, find_card, format_profile
from minid.models.config import UNetConfig

CONFIG = UNetConfig.tiny()
LATENT = 16


@pytest.fixture(scope="module")
def profiles(one_thread, tmp_path_factory):
    """One profiled step each: denoising with the seam's SDPA, denoising through the kernels' ops
    (maps at the cross-attention sites), and Stage 3's gating."""
    folder = tmp_path_factory.mktemp("profile")
    runs = {
        "sdpa": dict(step="denoise", attention="sdpa"),
        "kernels": dict(step="denoise", attention="auto", maps="cross"),
        "stage3": dict(step="stage3", attention="torch"),
    }
    return {
        name: profile_unet(CONFIG, LATENT, trace=folder / f"{name}.json", **kw)
        for name, kw in runs.items()
    }


def _channels(site) -> int:
    """The channels of a site's transformer block, from the config alone."""
    widths = CONFIG.block_out_channels
    if site.block == "down":
        return widths[site.level]
    if site.block == "mid":
        return widths[-1]
    return widths[::-1][site.level]


def _unit(site) -> int:
    """2·h·Nq·Nk·d for one batch row: the FLOP of q kᵀ (and of P v) of one attention."""
    h = CONFIG.num_heads
    d = _channels(site) // h
    nq = site.height * site.width
    nk = 77 if site.is_cross else nq
    return 2 * h * nq * nk * d


@pytest.mark.parametrize("name", ["sdpa", "kernels"])
def test_denoise_flops_equal_the_analytic_count_at_every_site(profiles, name):
    p = profiles[name]
    assert len(p.sites) == 20, [r.name for r in p.sites]  # 10 transformer blocks × self/cross
    assert p.rows_in_batch == 2
    levels = len(CONFIG.block_out_channels) - 1  # downsamplings
    for row in p.sites:
        level = {"down": row.site.level, "mid": levels, "up": levels - row.site.level}
        side = LATENT // 2 ** level[row.site.block]
        assert (row.site.height, row.nq) == (side, side * side), row.name
        b = 2  # one image with guidance
        assert row.flops == b * _unit(row.site) + b * _unit(row.site), (row.name, row.flops)
        assert len(row.ops) == 1, (row.name, row.ops)
        op = row.ops[0]
        want = "sdpa" if name == "sdpa" else "attention_with_map"
        assert op.op == want and op.want_map == (name == "kernels" and row.site.is_cross), op


def test_stage3_flops_equal_the_analytic_count_at_every_site(profiles):
    """Stage 3 (one (O, E, T) triple with guidance, 6 rows): every site computes the batch's plain
    attention (6 rows); the gated self-attention sites (down and mid) add two masked multi-source
    calls (the conditional and unconditional T rows) over 3 sources; every cross-attention site adds
    one token_replace from 2 sources (q kᵀ of T, O and E, then P' v: 4 units)."""
    p = profiles["stage3"]
    assert p.rows_in_batch == 6 and len(p.sites) == 20
    for row in p.sites:
        unit = _unit(row.site)
        plain = 6 * 2 * unit
        if row.site.is_cross:
            expected = plain + (1 + 2) * unit + unit  # q kᵀ of T, O, E; P' v
            ops = ["sdpa", "token_replace"]
        elif row.site.block in ("down", "mid"):
            expected = plain + 2 * 3 * 2 * unit
            ops = ["sdpa", "masked_multi_source", "masked_multi_source"]
        else:
            expected, ops = plain, ["sdpa"]
        assert row.flops == expected, (row.name, row.flops, expected, row.ops)
        assert [op.op for op in row.ops] == ops, (row.name, row.ops)


def test_the_table_sums_to_the_measured_step(profiles):
    for name, p in profiles.items():
        sites = sum(r.time_s for r in p.sites)
        assert all(r.time_s > 0 for r in p.sites), name
        assert 0 < sites < p.measured_s and p.rest_s > 0, (name, sites, p.measured_s)
        # the clock runs a little outside the profiler's range (its enter and exit): 3 %, plus 1 ms
        # for a thread switch on a busy CPU landing in those edges
        gap = abs(p.total_s - p.measured_s)
        assert gap < 0.03 * p.measured_s + 1e-3, (
            f"{name}: table {p.total_s:.6f} s vs measured {p.measured_s:.6f} s"
        )
        # the rest's parts are measured ops, and what is left between them
        assert abs(sum(p.rest_parts.values()) - p.rest_s) < 1e-9 * max(1.0, p.rest_s)
        measured_ops = {k: v for k, v in p.rest_parts.items() if not k.startswith("between")}
        assert all(v > 0 for v in measured_ops.values()) and "convolutions" in measured_ops
        assert p.rest_parts["between ops (Python, dispatch)"] > -0.01 * p.measured_s, p.rest_parts


def test_family_totals_and_their_sdpa_baseline(profiles):
    by_op = {name: {f.op: f for f in profiles[name].families} for name in ("kernels", "stage3")}
    kernels, stage3 = by_op["kernels"], by_op["stage3"]
    assert kernels["attention_with_map"].calls == 20 and kernels["masked_multi_source"].calls == 0
    assert stage3["masked_multi_source"].calls == 8 and stage3["token_replace"].calls == 10
    for name, families in by_op.items():
        ops = [op for r in profiles[name].sites for op in r.ops]
        for f in families.values():
            mine = [op for op in ops if op.op == f.op]
            assert f.flops == sum(op.flops for op in mine) and f.bytes == sum(o.bytes for o in mine)
            if f.calls:
                assert f.time_s > 0 and 0 < f.sdpa_s < float("inf"), (name, f)
    text = format_profile(profiles["stage3"])
    assert "masked multi-source" in text and "x SDPA" in text and "measured step" in text


def test_the_chrome_trace_names_the_sites_and_the_ops(profiles):
    trace = json.loads(profiles["stage3"].trace.read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "minid.site down0.0 self 16x16" in names, sorted(names)[:20]
    calls = [OpCall.parse(n) for n in names if n.startswith("minid.attention ")]
    assert {c.op for c in calls} == {"sdpa", "masked_multi_source", "token_replace"}, calls


def test_an_op_range_reads_back_as_its_call():
    call = OpCall("masked_multi_source", 1, 8, 4096, 4096, 40, 40, 2, sources=3, mode="map")
    assert OpCall.parse(call.range_name) == call
    assert call.flops == 3 * 4 * 8 * 4096 * 4096 * 40
    assert OpCall.parse("aten::mm") is None
    mutual = OpCall("mutual_attention", 2, 8, 1024, 1024, 80, 80, 2, sources=2)
    assert mutual.flops == 2 * 4 * 2 * 8 * 1024 * 1024 * 80  # the queries over 2·Nk keys


def test_the_command_runs_on_the_cpu_and_explains_its_columns(tmp_path, capsys, one_thread):
    trace = tmp_path / "t.json"
    argv = ["profile", "--unet", "tiny", "--device", "cpu", "--repeat", "1", "--trace", str(trace)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "down0.0 cross" in out and "fused forward with map" in out and trace.is_file(), out
    with pytest.raises(SystemExit):
        cli.main(["profile", "--help"])
    help_text = capsys.readouterr().out
    for column in ("GFLOP", "TFLOP/s", "step %", "SDPA ms", "%peak F"):
        assert column in help_text, column
    assert cli.main(["profile", "--unet", "tiny", "--step", "stage3", "--attention", "sdpa"]) == 2
    assert "auto, torch or triton" in capsys.readouterr().err


def test_the_peak_table_knows_the_common_cards():
    names = {
        "NVIDIA GeForce RTX 4090": "RTX 4090",
        "NVIDIA H100 80GB HBM3": "H100 SXM",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H200": "H200 SXM",
        "NVIDIA H200 NVL": "H200 NVL",
        "NVIDIA A100-SXM4-80GB": "A100 80GB SXM",
        "NVIDIA A100 80GB PCIe": "A100 80GB PCIe",
        "NVIDIA A10": "A10",
        "NVIDIA L4": "L4",
        "NVIDIA L40S": "L40S",
        "Tesla T4": "T4",
    }
    for device_name, card in names.items():
        found = find_card(device_name)
        assert found is not None and found.name == card, (device_name, found)
    assert find_card("NVIDIA GeForce GTX 1080") is None
    for card in PEAKS:
        assert card.fp32 > 0 and card.fp16 > card.fp32 and card.bandwidth > 0 and card.source
        assert card.peak_tflops(torch.float16) == card.fp16
