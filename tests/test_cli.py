from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main

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


def test_run_writes_resolved_config_and_stops_honestly(tmp_path: Path) -> None:
    code = main(["run", DEMO, "--out", str(tmp_path / "r"), "data.num_images=3", "data.num_val_images=2"])
    assert code == 3  # later stages are not implemented yet: non-zero, not a fake success
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("# resolved config, hash ")
    assert (tmp_path / "r" / "data_summary.json").is_file()


def test_config_show_prints_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", DEMO, "seed=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# hash ") and "seed: 5" in out
