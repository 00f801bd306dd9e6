from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumen_cli.main import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "train-base", "train-lumen", "expand", "evaluate", "data", "config"):
        assert cmd in out


def test_data_preview_writes_a_grid(tmp_path: Path) -> None:
    assert main(["data", "preview", DEMO, "--out", str(tmp_path), "--num", "3", "data.image_size=32"]) == 0
    grid = np.asarray(Image.open(tmp_path / "preview.png"))
    # 3 rows of 32-px tiles, 4 columns (image, seg, depth, normal), 2-px padding, 14-px header
    assert grid.shape == (14 + 3 * 34 + 2, 4 * 34 + 2, 3)
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == 3


def test_typo_in_override_exits_2_naming_valid_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", DEMO, "data.num_imgs=3"]) == 2
    err = capsys.readouterr().err
    assert "data.num_imgs" in err and "num_images" in err


def test_stage_commands_reject_bad_configs_before_starting_prefect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("run", "train-base", "train-lumen", "expand", "evaluate", "gains"):
        assert main([command, DEMO, "--out", str(tmp_path / "r"), "data.num_imgs=3"]) == 2
        assert "unknown config key 'data.num_imgs'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a config that does not validate


def test_config_show_prints_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", DEMO, "seed=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# hash ") and "seed: 5" in out


def test_gains_configs_resolve_every_setting() -> None:
    """Each setting of the shipped gains configs is the config plus its overrides, and validates."""
    from pipeline.config import gains_setting_configs, load_config

    settings = gains_setting_configs(REPO / "configs" / "gains-toy.yaml")
    assert list(settings) == ["cross-domain", "in-domain"]
    cross = settings["cross-domain"]
    assert cross.data.domains == ["day", "studio"] and cross.perception.test_domains == ["evening", "night"]
    assert cross.generate.prompt_template == "{variation}, {caption}"
    camvid = load_config(REPO / "configs" / "gains-camvid.yaml")
    assert camvid.perception.report_split == "val" and "real+oracle" not in camvid.perception.arms
