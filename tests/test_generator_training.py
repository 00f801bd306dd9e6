"""Generator training at scale: parallel data loading, the VAE edge loss, the GPU recipe's pieces (on CPU)."""

from __future__ import annotations

import argparse
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


def test_adversarial_decoder_finetune_trains_a_critic_on_crops_and_resumes_bit_identically(
    tmp_path: Path,
) -> None:
    from pipeline.data import ToyScenes
    from pipeline.lumen.base import build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer
    from pipeline.lumen.train_base import finetune_decoder

    ds = ToyScenes(num_images=4, image_size=(RES, RES), seed=0)
    images = np.stack([ds.load(k).image for k in ds.keys()])

    def vae():
        return build_tiny_components(build_tokenizer(["a"]), RES, seed=0, preset=PRESET).vae

    kw = {"batch_size": 2, "lr": 1e-3, "checkpoint_every": 3, "progress": False, "adversarial_weight": 0.5,
          "adversarial_warmup": 2, "crop": RES // 2}  # fmt: skip
    plain, adv = vae(), vae()
    finetune_decoder(plain, images, 4, tmp_path / "plain", **{**kw, "adversarial_weight": 0.0})
    finetune_decoder(adv, images, 4, tmp_path / "adv", **kw)
    w = "decoder.conv_out.weight"
    assert not torch.equal(plain.state_dict()[w], adv.state_dict()[w])  # the critic's term moved the decoder
    assert (tmp_path / "adv" / "step-000003").is_dir()
    shutil.rmtree(tmp_path / "adv" / "step-000004")  # killed after step 3's checkpoint (critic included)
    again = vae()
    assert len(finetune_decoder(again, images, 4, tmp_path / "adv", **kw)) == 1
    for a, b in zip(adv.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="crop must be a multiple"):
        finetune_decoder(vae(), images, 1, tmp_path / "bad", **{**kw, "crop": RES // 2 + 1})


def test_presets_by_name_keep_the_latent_grid() -> None:
    from pipeline.lumen.base import PRESETS, build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer

    tok = build_tokenizer(["a scene"])
    sizes, scales = {}, {}
    for name, preset in PRESETS.items():
        comps = build_tiny_components(tok, 64, preset=preset)
        scales[name] = comps.vae_scale
        sizes[name] = sum(p.numel() for p in comps.unet.parameters())
        x = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            z = comps.vae.encode(x).latent_dist.mean
        assert z.shape == (1, 4, 64 // comps.vae_scale, 64 // comps.vae_scale)
    assert scales == {"tiny": 4, "small": 4, "small-f2": 2}
    assert sizes["small"] > 1.5 * sizes["tiny"] and sizes["small-f2"] == sizes["small"]


def test_recipe_step_times_and_public_config() -> None:
    recipe = _recipe()
    cfg = load_config(ROOT / "configs" / "gpu-base.yaml", [
        "device=cpu", "base.preset=tiny", "base.batch_size=2", "base.vae_batch_size=2", "layouts.num_components=4",
    ])  # fmt: skip
    times = recipe.step_times(cfg, torch.device("cpu"), lumen_batch=2)
    assert set(times) == {"vae", "unet", "lumen"} and all(t > 0 for t in times.values())
    public = recipe._public(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert "load_workers" not in public["data"] and "runner" not in public


def test_recipe_base_command_keeps_the_callers_overrides() -> None:
    """A base trained with ``base.preset=small-f2`` records a command that rebuilds that preset."""
    recipe = _recipe()
    args = argparse.Namespace(pair="toy", data=None, override=["base.preset=small-f2", "base.train_steps=5"])
    cfg = load_config(ROOT / "configs" / "gpu-base.yaml", ["base.preset=small-f2", "base.train_steps=123"])
    command = recipe._base_command(args, cfg)
    assert command.startswith("python scripts/gpu_recipe.py train --pair toy --minutes 0 ")
    assert command.split()[-3:] == ["base.vae_steps=4000", "base.train_steps=123", "base.preset=small-f2"]


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


def test_continue_unet_trains_only_the_unet_and_text_encoder_and_resumes(tmp_path: Path) -> None:
    from pipeline.data import ToyScenes
    from pipeline.lumen.base import build_tiny_components, load_base
    from pipeline.lumen.tokenizer import build_tokenizer
    from pipeline.lumen.train_base import BaseTrainSettings, continue_unet

    ds = ToyScenes(num_images=6, image_size=(RES, RES), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    build_tiny_components(build_tokenizer(captions), RES, seed=0, preset=PRESET).save(tmp_path / "trained")
    s = BaseTrainSettings(resolution=RES, unet_steps=4, batch_size=2, unet_lr=1e-3, warmup_steps=1,
                          checkpoint_every=2, ema_decay=0.5)  # fmt: skip
    kw = {"progress": False, "sample_prompts": captions[:1]}
    whole = continue_unet(load_base(tmp_path / "trained"), images, captions, tmp_path / "whole", s, **kw)
    ref = load_base(tmp_path / "trained")
    for part in ("vae", "unet", "text_encoder"):
        moved = [not torch.equal(a, b) for a, b in zip(
            getattr(ref, part).state_dict().values(), getattr(whole, part).state_dict().values(), strict=True
        )]  # fmt: skip
        assert any(moved) == (part != "vae"), part  # the latent space stays; the denoiser moves
    saved = load_base(tmp_path / "whole")
    assert (tmp_path / "whole" / "samples.png").is_file()
    assert saved.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    for a, b in zip(saved.unet.state_dict().values(), whole.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    continue_unet(load_base(tmp_path / "trained"), images, captions, tmp_path / "split", s, **kw)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "unet" / "step-000004")  # killed after step 2
    split = continue_unet(load_base(tmp_path / "trained"), images, captions, tmp_path / "split", s, **kw)
    for a, b in zip(whole.unet.state_dict().values(), split.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="captions"):
        continue_unet(ref, images, captions[:2], tmp_path / "bad", s, **kw)


def test_condition_map_is_recovered_and_folded_into_the_first_convolution() -> None:
    from pipeline.lumen.base import build_tiny_components
    from pipeline.lumen.controlnet import build_controlnet, fit_condition_map, remap_condition_input
    from pipeline.lumen.tokenizer import build_tokenizer

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    new = rng.uniform(size=(5, 3, RES, RES)).astype(np.float32)
    old = np.einsum("ij,njhw->nihw", a, new) + b[None, :, None, None]
    a_fit, b_fit, r2 = fit_condition_map(new, old)
    assert r2 > 0.9999 and np.allclose(a_fit, a, atol=1e-4) and np.allclose(b_fit, b, atol=1e-4)
    noisy = old + rng.normal(size=old.shape) * old.std(axis=(0, 2, 3), keepdims=True)
    assert 0.3 < fit_condition_map(new, noisy)[2] < 0.7  # half the variance is noise

    base = build_tiny_components(build_tokenizer(["a"]), RES, seed=0, preset=PRESET)
    cn = build_controlnet(base, 4, seed=0)
    conv = cn.controlnet_cond_embedding.conv_in
    with torch.no_grad():
        conv.weight.normal_()  # a trained ControlNet's first convolution
        before = conv(torch.from_numpy(old))
    remap_condition_input(cn, a, b)
    with torch.no_grad():
        after = cn.controlnet_cond_embedding.conv_in(torch.from_numpy(new))
    assert cn.config.conditioning_channels == 3 and after.shape == before.shape
    inner = (..., slice(1, -1), slice(1, -1))  # the border reads the zero padding, not b
    assert torch.allclose(after[inner], before[inner], atol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        remap_condition_input(cn, a, b)  # it reads 3 channels now


def test_widened_controlnet_ignores_its_new_channels_until_trained() -> None:
    """widen_condition_input: K zero-weighted input channels; the first convolution's output is the old
    one whatever the new channels hold, and the new weights get gradients."""
    from pipeline.lumen.base import build_tiny_components
    from pipeline.lumen.controlnet import build_controlnet, widen_condition_input
    from pipeline.lumen.tokenizer import build_tokenizer

    base = build_tiny_components(build_tokenizer(["a"]), RES, seed=0, preset=PRESET)
    cn = build_controlnet(base, 3, seed=0)
    with torch.no_grad():
        cn.controlnet_cond_embedding.conv_in.weight.normal_()
    cond = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        before = cn.controlnet_cond_embedding.conv_in(cond)
    widen_condition_input(cn, 2)
    conv = cn.controlnet_cond_embedding.conv_in
    assert cn.config.conditioning_channels == 5 and conv.in_channels == 5
    wide = torch.cat([cond, 10 * torch.randn(2, 2, RES, RES)], 1)
    torch.testing.assert_close(conv(wide), before, atol=1e-5, rtol=0)
    conv(wide).square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad[:, 3:].abs().sum() > 0
    with pytest.raises(ValueError, match="extra"):
        widen_condition_input(cn, 0)


def test_recipe_continue_base_smoke(tmp_path: Path) -> None:
    """``train --continue-base --smoke``: the shipped base's UNet trains on, then a ControlNet over it;
    nothing is exported."""
    from pipeline.assets import ASSETS_DIR

    recipe = _recipe()
    before = (ASSETS_DIR / "tiny-base" / "asset.json").read_text()
    code = recipe.main(["train", "--pair", "toy", "--smoke", "--continue-base", "--workers", "1",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert code in (0, None)
    summary = json.loads((tmp_path / "work" / "toy" / "toy-logs" / "summary.json").read_text())
    assert summary["pair"] == "toy" and summary["steps"] == "smoke"
    log = (tmp_path / "work" / "toy" / "toy-logs" / "base_train_log.csv").read_text().splitlines()
    assert log[0].startswith("phase") and all(row.startswith("unet,") for row in log[1:])  # no VAE phase
    assert (ASSETS_DIR / "tiny-base" / "asset.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy-logs.tar"]


def test_recipe_base_only_goes_with_continue_base(tmp_path: Path) -> None:
    recipe = _recipe()
    with pytest.raises(SystemExit, match="--base-only goes with --continue-base"):
        recipe.main(["train", "--pair", "toy", "--smoke", "--base-only", "--workers", "1",
                     "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])  # fmt: skip


def test_recipe_adversarial_decoder_finetune_smoke(tmp_path: Path) -> None:
    """``finetune-vae --smoke --adversarial-weight --crop``: records its settings and its reproduce
    command's flags; nothing is exported."""
    from pipeline.assets import ASSETS_DIR

    recipe = _recipe()
    before = (ASSETS_DIR / "tiny-base" / "asset.json").read_text()
    code = recipe.main(["finetune-vae", "--pair", "toy", "--smoke", "--steps", "2", "--batch-size", "2",
                        "--adversarial-weight", "0.5", "--crop", "32", "--workers", "1", "--device", "cpu",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert code in (0, None)
    summary = json.loads((tmp_path / "out" / "toy-decoder.json").read_text())
    assert (summary["steps"], summary["adversarial_weight"], summary["crop"]) == (2, 0.5, 32)
    assert (tmp_path / "work" / "toy-decoder" / "checkpoints" / "step-000002").is_dir()
    assert (ASSETS_DIR / "tiny-base" / "asset.json").read_text() == before
