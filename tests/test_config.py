from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, apply_overrides, build_config, config_hash, load_config, save_config
from pipeline.runs import prepare_run_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "camvid.yaml", "sd15-dinov2.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.name


def test_overrides_are_parsed_as_yaml_values() -> None:
    cfg = build_config(
        {}, ["data.num_images=64", "generate.variation_prompts=[at night, in snow]", "data.root=null"]
    )
    assert cfg.data.num_images == 64
    assert cfg.generate.variation_prompts == ["at night", "in snow"]
    assert cfg.data.root is None


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", ["data.num_imgs=3"])
    msg = str(info.value)
    assert "data.num_imgs" in msg and "num_images" in msg and "image_size" in msg


def test_unknown_top_level_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"Valid keys under the top level: .*data"):
        build_config({"dta": {}})


def test_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.num_images"):
        build_config({}, ["data.num_images=-1"])


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_folder_adapter_requires_root() -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_config({"data": {"adapter": "camvid"}})


def test_hash_is_stable_and_content_based(tmp_path: Path) -> None:
    a = build_config({"seed": 3})
    assert config_hash(a) == config_hash(build_config({"seed": 3}))
    assert config_hash(a) != config_hash(build_config({"seed": 4}))
    path = save_config(a, tmp_path / "config.yaml")
    assert config_hash(load_config(path)) == config_hash(a)
    assert yaml.safe_load(path.read_text())["seed"] == 3


def test_stage_keys_follow_the_sections_each_stage_reads() -> None:
    from pipeline.config import config_dict
    from pipeline.runs import stage_hashes

    def keys(raw: dict) -> dict[str, str]:
        return stage_hashes(config_dict(build_config(raw)))

    ref = keys({})
    changed = {
        "perception.steps": {"perception": {"steps": 7}},
        "generate.variants": {"generate": {"variants": 5}},
        "layouts.num_components": {"layouts": {"num_components": 4}},
        "base.train_steps": {"base": {"train_steps": 9}},
        "seed": {"seed": 5},
    }
    first = {"perception.steps": "evaluate", "generate.variants": "expand", "layouts.num_components": "lumen",
             "base.train_steps": "base", "seed": "data"}  # fmt: skip
    order = list(ref)
    for key, raw in changed.items():
        new = keys(raw)
        redone = [s for s in order if new[s] != ref[s]]
        assert redone == order[order.index(first[key]) :], key  # that stage and every later one
    for raw in (
        {"runner": {"max_workers": 5}},
        {"data": {"load_workers": 3}},
        {"name": "other"},
        {"device": "cpu"},
    ):
        assert keys(raw) == ref, raw  # where and how fast, not what


def test_run_dir_supersedes_only_the_stages_whose_config_changed(tmp_path: Path) -> None:
    run = prepare_run_dir(build_config({"seed": 1}), tmp_path / "run")
    assert (run / "config.yaml").is_file() and (run / "stages.json").is_file()
    assert prepare_run_dir(build_config({"seed": 1}), run) == run  # same config: resume
    for rel in ("base/model_index.json", "shards/real/a.tar", "perception/r/run.json", "report/report.md",
                "summaries/expand.json", "summaries/evaluate.json", "summary.md"):  # fmt: skip
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(rel)

    prepare_run_dir(build_config({"seed": 1, "perception": {"steps": 9}}), run)
    stages = json.loads((run / "stages.json").read_text())
    (entry,) = stages["superseded"]
    assert entry["stages"] == ["evaluate"] and entry["sections"] == ["perception"]
    assert sorted(entry["moved"]) == ["perception", "report", "summaries/evaluate.json", "summary.md"]
    old = run / entry["moved_to"]
    assert (old / "perception" / "r" / "run.json").read_text() == "perception/r/run.json"  # kept, not deleted
    assert yaml.safe_load((old / "config.yaml").read_text())["perception"]["steps"] != 9  # what made them
    for kept in ("base/model_index.json", "shards/real/a.tar", "summaries/expand.json"):
        assert (run / kept).is_file(), kept  # models and shards reused
    assert not (run / "perception").exists()
    prepare_run_dir(build_config({"seed": 1, "perception": {"steps": 9}}), run)  # now a plain resume
    assert len(json.loads((run / "stages.json").read_text())["superseded"]) == 1

    prepare_run_dir(build_config({"seed": 2, "perception": {"steps": 9}}), run)  # data: everything
    entry = json.loads((run / "stages.json").read_text())["superseded"][-1]
    assert entry["stages"] == ["data", "base", "lumen", "distill", "mapper", "controls", "expand", "evaluate"]
    assert not (run / "base").exists() and not (run / "shards").exists()


def test_default_run_dirs_are_new_each_time(tmp_path: Path) -> None:
    cfg = build_config({"runs_dir": str(tmp_path)})
    assert prepare_run_dir(cfg) != prepare_run_dir(cfg)


def test_generate_strength_is_bounded_and_needs_source_images_and_a_skipping_scheduler() -> None:
    assert build_config({"name": "s"}).generate.strength == 1.0
    assert build_config({"name": "s", "generate": {"strength": 0.8}}).generate.strength == 0.8
    for gen, match in [
        ({"strength": 0}, "strength"),
        ({"strength": 1.2}, "strength"),
        ({"strength": 0.8, "source": "labels"}, "needs generate.source=images"),
        ({"strength": 0.8, "scheduler": "pndm"}, "not pndm"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config({"name": "s", "generate": gen})


def test_layout_supersample_must_refine_the_generation_factor_and_needs_source_images() -> None:
    g = build_config(
        {"name": "s", "lumen": {"supersample": 2}, "generate": {"layout_supersample": 3}}
    ).generate
    assert (g.layout_supersample, g.layout_supersample_after) == (3, 0.5)
    assert build_config({"name": "s"}).generate.layout_supersample is None
    for raw, message in (
        ({"lumen": {"supersample": 2}, "generate": {"layout_supersample": 2}}, "is the factor the variants"),
        (
            {"lumen": {"supersample": 2}, "generate": {"supersample": 3, "layout_supersample": 3}},
            "null or above 3",
        ),
        ({"generate": {"layout_supersample": 3, "layout_sharpen": 2}}, "use one"),
        ({"generate": {"layout_supersample": 3, "source": "labels", "label_dir": "x"}}, "source=images"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config({"name": "s", **raw})


def test_layout_guidance_needs_condition_guidance_and_sharpen_until_is_a_share() -> None:
    g = build_config({"name": "s", "generate": {"condition_guidance": True, "layout_guidance": 5}}).generate
    assert g.layout_guidance == 5.0 and build_config({"name": "s"}).generate.layout_guidance is None
    assert build_config({"name": "s"}).generate.supersample is None
    for gen, match in [
        ({"layout_guidance": 5}, "needs generate.condition_guidance=true"),
        ({"condition_guidance": True, "layout_guidance": -1}, "layout_guidance"),
        ({"layout_sharpen_until": 0}, "layout_sharpen_until"),
        ({"layout_sharpen_until": 1.5}, "layout_sharpen_until"),
        ({"supersample": 0}, "supersample"),
        ({"supersample": 5}, "supersample"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config({"name": "s", "generate": gen})


def test_candidates_are_bounded_and_need_source_images_and_a_layout_controlnet() -> None:
    from pipeline.preflight import preflight

    g = build_config({"name": "s", "generate": {"candidates": 4, "candidate_score": "mse"}}).generate
    assert (g.candidates, g.candidate_score) == (4, "mse")
    assert (
        build_config({"name": "s"}).generate.candidates,
        build_config({"name": "s"}).generate.candidate_score,
    ) == (1, "edges")
    for gen, match in [
        ({"candidates": 0}, "candidates"),
        ({"candidates": 9}, "candidates"),
        ({"candidate_score": "psnr"}, "candidate_score"),
        ({"candidates": 2, "source": "labels"}, "needs generate.source=images"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config({"name": "s", "generate": gen})
    seg = build_config(
        {"name": "s", "data": {"num_images": 4}, "lumen": {"condition": "seg"}, "generate": {"candidates": 2}}
    )
    with pytest.raises(ConfigError, match="not a layout"):
        preflight(seg, "expand")
    ok = build_config({"name": "s", "data": {"num_images": 4}, "generate": {"candidates": 2}})
    assert any("best of 2 by layout agreement" in c for c in preflight(ok, "expand").checks)
