"""Typed configs: paper defaults, presets, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgan.config import (
    PRESET_DIR,
    GanConfig,
    config_hash,
    flatten,
    load_config,
    parse_override,
    to_yaml,
)
from dgan.errors import DganError


def test_defaults_are_the_papers_values():
    c = GanConfig()
    assert (c.data.image_size, c.train.batch_size, c.train.iterations) == (128, 4, 500_000)
    assert (c.train.n_critic, c.train.beta1, c.train.beta2) == (5, 0.5, 0.999)
    assert (c.train.lr_g, c.train.lr_end) == (2e-4, 1e-6)
    lw = c.loss
    assert (
        lw.lambda_cls_r,
        lw.lambda_cls_f,
        lw.lambda_rec,
        lw.lambda_sd_cyc,
        lw.lambda_sd_con,
    ) == (
        2.0,
        5.0,
        5.0,
        5.0,
        1.0,
    )
    assert load_config("gan", ["paper"]) == c


@pytest.mark.parametrize("job", ["gan", "inspector", "synth", "tune"])
def test_every_job_has_a_config_and_every_preset_validates(job):
    load_config(job)
    for preset in (PRESET_DIR / job).rglob("*.yaml"):
        load_config(job, [str(preset)])


def test_table2_presets_switch_the_four_components():
    rows = {
        "stargan": (False, False, False, False),
        "scc": (True, False, False, False),
        "scc_ani": (True, True, False, False),
        "scc_lwc": (True, False, True, False),
        "scc_lwc_sc": (True, False, True, True),
        "full": (True, True, True, True),
    }
    for name, switches in rows.items():
        g = load_config("gan", ["demo", f"table2/{name}"]).generator
        assert (g.scc, g.ani, g.lwc, g.sc) == switches, name
        assert g.conv_dim == 32  # the size preset still applies
        # the demo's layered label sets where a row has LWC to paint layers with, else one pass
        assert g.label_sets == ("layered" if g.lwc else "joint"), name


def test_overrides_apply_in_order_and_parse_yaml_values(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  batch_size: 8\n  lr_g: 1.0e-4\n")
    c = load_config("gan", ["demo", str(f)], ["train.batch_size=6", "data.classes=[crack]"])
    assert c.train.batch_size == 6 and c.train.lr_g == 1e-4 and c.data.classes == ["crack"]
    assert parse_override("a.b.c=true") == {"a": {"b": {"c": True}}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.bogus=1", "train.bogus: unknown key; allowed here: batch_size"),
        ("bogus.key=1", "bogus: unknown key; allowed here: data, discriminator"),
        ("train.batch_size=many", "train.batch_size: Input should be a valid integer"),
        ("train.mixed_precision=fp8", "'no', 'bf16' or 'fp16'"),
        ("train.beta1=1.5", "train.beta1: Input should be less than 1"),
        ("data.image_size=96", "must be a power of two"),
        ("generator.chroma_stride=0", "generator.chroma_stride: Input should be greater than"),
        ("discriminator.augment=cutout", "discriminator.augment: Input should be"),
        ("generator.spade_from=encoder", "Input should be 'decoder' or 'bottleneck'"),
        ("loss.rec_region=inside", "loss.rec_region: Input should be 'image' or 'outside_mask'"),
        ("loss.diversity_cap=0", "loss.diversity_cap: Input should be greater than 0"),
        ("generator.noise_gain=0", "generator.noise_gain: Input should be greater than 0"),
        ("discriminator.stem=-1", "discriminator.stem: Input should be greater than or equal to 0"),
        ("train.set_power=2", "train.set_power: Input should be less than or equal to 1"),
        ("generator.grain=-1", "generator.grain: Input should be greater than or equal to 0"),
        ("generator.paint_space=rgb", "generator.paint_space: Input should be 'logit' or 'image'"),
        ("generator.grain_space=rgb", "generator.grain_space: Input should be 'logit' or 'image'"),
        ("eval.realism_repeats=0", "eval.realism_repeats: Input should be greater than or equal"),
        ("eval.realism_repeats=21", "eval.realism_repeats: Input should be less than or equal"),
        ("train.batch_size", "expected section.key=value"),
    ],
)
def test_bad_values_fail_naming_the_key_and_what_is_allowed(override, message):
    with pytest.raises(DganError) as err:
        load_config("gan", ["demo"], [override])
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_resolved_config_round_trips_through_yaml_and_hash_ignores_logging(tmp_path: Path):
    c = load_config("gan", ["demo"], ["train.seed=3"])
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(c))
    assert load_config("gan", [str(f)]) == c
    other = load_config("gan", ["demo"], ["train.seed=3", "log.log_every=7"])
    assert config_hash(c, ("log.",)) == config_hash(other, ("log.",)) != config_hash(other)
    assert flatten(c)["train.seed"] == 3


def test_fine_source_head_is_off_in_the_paper_preset_and_bounded_by_ds_depth():
    assert load_config("gan", ["paper"], []).discriminator.fine_src_layer is None
    assert load_config("gan", ["demo"], ["discriminator.fine_src_layer=3"])
    with pytest.raises(DganError, match=r"fine_src_layer=4 must be below D's depth \(4"):
        load_config("gan", ["demo"], ["discriminator.fine_src_layer=4"])


def test_minibatch_std_is_off_in_the_paper_preset_and_must_divide_each_half_of_a_batch():
    assert load_config("gan", ["paper"], []).discriminator.minibatch_std == 0
    assert load_config("gan", ["demo"], ["discriminator.minibatch_std=8"])  # batch 16: 8 + 8
    with pytest.raises(DganError, match=r"minibatch_std=3 must divide train.batch_size / 2 = 8"):
        load_config("gan", ["demo"], ["discriminator.minibatch_std=3"])


def test_the_diversity_term_and_rec_region_are_off_in_the_paper_preset_and_need_gs_map():
    paper = load_config("gan", ["paper"], []).loss
    assert (paper.lambda_diversity, paper.rec_region) == (0, "image")
    assert load_config("gan", ["paper"], ["loss.lambda_diversity=2"]).loss.lambda_diversity == 2
    with pytest.raises(DganError, match="needs generator.ani=true and generator.lwc=true"):
        load_config("gan", ["paper"], ["loss.lambda_diversity=2", "generator.ani=false"])
    with pytest.raises(DganError, match="rec_region=outside_mask weights L_rec by G's map m"):
        load_config("gan", ["paper", "table2/stargan"], ["loss.rec_region=outside_mask"])


def test_noise_gain_is_1_in_the_paper_preset_and_needs_ani():
    assert load_config("gan", ["paper"], []).generator.noise_gain == 1
    assert load_config("gan", ["demo"], ["generator.noise_gain=30"]).generator.noise_gain == 30
    with pytest.raises(DganError, match="noise_gain=30.0 scales ANI's noise strengths"):
        load_config("gan", ["demo"], ["generator.noise_gain=30", "generator.ani=false"])


def test_restored_output_is_off_in_the_paper_preset_and_needs_its_loss_weight():
    paper = load_config("gan", ["paper"], [])
    assert paper.discriminator.restored_output is False
    assert paper.loss.lambda_cls_restored_d == 0
    on = ["discriminator.restored_output=true", "loss.lambda_cls_restored_d=1"]
    assert load_config("gan", ["paper"], on).discriminator.restored_output
    with pytest.raises(DganError, match="set it above 0"):
        load_config("gan", ["paper"], ["discriminator.restored_output=true"])


def test_projection_discriminator_is_off_in_the_paper_preset():
    assert load_config("gan", ["paper"], []).discriminator.projection is False
