"""Generator training at scale: parallel data loading, the VAE edge loss, the GPU recipe's pieces (on CPU)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import PRESET

from pipeline.config import load_config
from pipeline.data import Quarantine

ROOT = Path(__file__).resolve().parents[1]
RES = 16


def _recipe():
    spec = importlib.util.spec_from_file_location("gpu_recipe", ROOT / "scripts" / "gpu_recipe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_recipe"] = module
    spec.loader.exec_module(module)
    return module


def test_parallel_collect_returns_what_a_serial_load_returns(tmp_path: Path) -> None:
    from pipeline.lumen.stages import collect_samples

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.num_images=10", "data.image_size=[32, 32]"])
    serial = collect_samples(cfg, (16, 16), Quarantine(None), progress=False)
    parallel = collect_samples(cfg, (16, 16), Quarantine(None), progress=False, workers=2)
    assert [s.key for s in serial] == [s.key for s in parallel] and len(serial) == 10
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.seg, b.seg) and a.caption == b.caption


def test_vae_edge_loss_trains_and_is_recorded(tmp_path: Path) -> None:
    from pipeline.data import ToyScenes
    from pipeline.lumen.train_base import BaseTrainSettings, _image_gradients, train_base

    x = torch.zeros(1, 3, 4, 4)
    x[..., 2:] = 1.0
    dx, dy = _image_gradients(x)
    assert dx.abs().sum() == 3 * 4 and dy.abs().sum() == 0  # one vertical edge, four rows
    ds = ToyScenes(num_images=4, image_size=(RES, RES), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    images = np.stack([s.image for s in samples])
    s = BaseTrainSettings(resolution=RES, vae_steps=3, vae_batch_size=2, vae_crop=RES, edge_weight=0.5,
                          unet_steps=2, batch_size=2, warmup_steps=1, mixed_precision="auto")  # fmt: skip
    train_base(images, [x.caption for x in samples], tmp_path, s, preset=PRESET, progress=False,
               sample_prompts=[samples[0].caption])  # fmt: skip
    settings = json.loads((tmp_path / "train_settings.json").read_text())
    assert settings["edge_weight"] == 0.5 and settings["device"] == "cpu"


def test_decoder_finetune_keeps_the_encoder_lowers_the_loss_and_resumes(tmp_path: Path) -> None:
    from pipeline.data import ToyScenes
    from pipeline.lumen.base import build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer
    from pipeline.lumen.train_base import finetune_decoder, images_to_tensor

    ds = ToyScenes(num_images=6, image_size=(RES, RES), seed=0)
    images = np.stack([ds.load(k).image for k in ds.keys()])

    def vae():
        return build_tiny_components(build_tokenizer(["a"]), RES, seed=0, preset=PRESET).vae

    def recon_l1(model) -> float:
        x = images_to_tensor(images)
        with torch.no_grad():
            return float((model.decode(model.encode(x).latent_dist.mean).sample - x).abs().mean())

    ref = vae()
    tuned = vae()
    before = recon_l1(tuned)
    kw = {"batch_size": 4, "lr": 3e-3, "checkpoint_every": 5, "progress": False}
    losses = finetune_decoder(tuned, images, 40, tmp_path / "a", **kw)
    assert len(losses) == 40 and recon_l1(tuned) < 0.8 * before
    for (name, a), b in zip(ref.state_dict().items(), tuned.state_dict().values(), strict=True):
        same = torch.equal(a, b)
        assert same != name.startswith(("decoder.", "post_quant_conv.")), name  # only the decoder moved

    whole = vae()
    finetune_decoder(whole, images, 20, tmp_path / "b", **kw)
    shutil.rmtree(tmp_path / "b" / "step-000020")  # as if killed after the checkpoint of step 15
    split = vae()  # a fresh process: the weights come from the checkpoint
    assert len(finetune_decoder(split, images, 20, tmp_path / "b", **kw)) == 5
    for a, b in zip(whole.state_dict().values(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_presets_by_name_keep_the_latent_grid() -> None:
    from pipeline.lumen.base import PRESETS, build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer

    tok = build_tokenizer(["a scene"])
    sizes = {}
    for name, preset in PRESETS.items():
        comps = build_tiny_components(tok, 64, preset=preset)
        assert comps.vae_scale == 4
        sizes[name] = sum(p.numel() for p in comps.unet.parameters())
    assert sizes["small"] > 1.5 * sizes["tiny"]


def test_recipe_step_times_and_public_config() -> None:
    recipe = _recipe()
    cfg = load_config(ROOT / "configs" / "gpu-base.yaml", [
        "device=cpu", "base.preset=tiny", "base.batch_size=2", "base.vae_batch_size=2", "layouts.num_components=4",
    ])  # fmt: skip
    times = recipe.step_times(cfg, torch.device("cpu"), lumen_batch=2)
    assert set(times) == {"vae", "unet", "lumen"} and all(t > 0 for t in times.values())
    public = recipe._public(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert "load_workers" not in public["data"] and "runner" not in public


@pytest.mark.parametrize("pair", ["toy", "camvid"])
def test_recipe_configs_fit_the_shipped_assets(pair: str) -> None:
    """The shipped assets were made by the recipe's configs: same layouts and sizes as recorded."""
    from pipeline.assets import verify_asset

    recipe = _recipe()
    base_cfg, lumen_cfg, base_name, lumen_name = recipe.PAIRS[pair]
    cfg = load_config(ROOT / lumen_cfg)
    meta = verify_asset(ROOT / "pipeline" / "assets" / lumen_name)
    assert (
        meta["base"] == base_name
        and meta["config"]["layouts"]["num_components"] == cfg.layouts.num_components
    )
    assert meta["config"]["data"]["image_size"] == list(cfg.data.image_size)
    assert (
        verify_asset(ROOT / "pipeline" / "assets" / base_name)["preset"]
        == load_config(ROOT / base_cfg).base.preset
    )
