from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.assets import AssetError, asset_path, available_assets, verify_asset


def test_shipped_assets_verify_and_record_how_to_reproduce_them() -> None:
    assert {"tiny-base", "tiny-lumen-layout"} <= set(available_assets())
    for name in available_assets():
        meta = verify_asset(asset_path(name))
        assert meta["command"].startswith(("lumen ", "python scripts/gpu_recipe.py ")) and meta["files"]


def test_a_modified_asset_file_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "tiny-lumen-layout"
    shutil.copytree(asset_path("tiny-lumen-layout"), copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        verify_asset(copy)


def test_shipped_controlnet_matches_its_pca_and_base() -> None:
    from pipeline.layouts import PCA

    folder = asset_path("tiny-lumen-layout")
    card = json.loads((folder / "lumen.json").read_text())
    pca = PCA.load(folder / "pca.safetensors")
    assert card["layout"]["pca"] == pca.fingerprint() and pca.num_components == card["channels"] == 8
    assert card["base_model"].startswith("lumen-assets/tiny-base@")


def test_runs_fall_back_to_the_shipped_models_only_when_they_fit(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.lumen.stages import lumen_folder, shipped_base

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert lumen_folder(demo, tmp_path) == asset_path("tiny-lumen-layout")
    assert shipped_base(demo) == asset_path("tiny-base")
    other_n = demo.model_copy(update={"layouts": demo.layouts.model_copy(update={"num_components": 4})})
    with pytest.raises(FileNotFoundError, match="no shipped one fits"):
        lumen_folder(other_n, tmp_path)
    assert demo.lumen.supersample == 2  # the shipped toy ControlNet works at 2x the scenes' size
    at_1x = demo.model_copy(update={"lumen": demo.lumen.model_copy(update={"supersample": 1})})
    with pytest.raises(FileNotFoundError, match="no shipped one fits"):
        lumen_folder(at_1x, tmp_path)
    at_64 = demo.model_copy(update={"base": demo.base.model_copy(update={"resolution": 64})})
    assert shipped_base(at_64) is None
    folder = demo.model_copy(update={"data": demo.data.model_copy(update={"adapter": "folder"})})
    assert shipped_base(folder) is None  # no model was shipped for user folders


def test_exported_assets_record_no_build_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers writes the folder a model was saved from into its config.json; an exported asset keeps
    the config without it (and shipped ones carry none), so nothing in it names the build machine."""
    import pipeline.assets as assets

    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "config.json").write_text(
        json.dumps({"_name_or_path": "/tmp/build/unet", "in_channels": 4})
    )
    (src / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "assets")
    dst = assets.export_asset(src, "x", {"command": "lumen test"})
    assert json.loads((dst / "unet" / "config.json").read_text()) == {"in_channels": 4}
    assert verify_asset(dst)["files"].keys() == {"unet/config.json", "model_index.json"}
    for name in available_assets():
        for config in asset_path(name).rglob("config.json"):
            assert "_name_or_path" not in json.loads(config.read_text()), config
