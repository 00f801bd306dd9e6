"""LUMEN model: tiny seeded SD-architecture models built from config dicts (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import PRESET

from pipeline.conditions import (
    depth_map,
    edge_map,
    guided_filter,
    outline_sharpen,
    seg_onehot,
    sharpen,
    sparse_mask,
)
from pipeline.data import ToyScenes
from pipeline.lumen.base import BaseModelNotFoundError, build_tiny_components, load_base
from pipeline.lumen.controlnet import ControlTrainSettings, LumenTrainer, build_controlnet, embedding_channels
from pipeline.lumen.generate import LumenGenerator, plan_variants, variant_seed
from pipeline.lumen.tokenizer import build_tokenizer

RES = 16
N = 5  # layout channels


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = ToyScenes(num_images=4, image_size=(RES, RES), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    images = np.stack([s.image for s in samples])
    rng = np.random.default_rng(0)
    conds = rng.random((4, N, RES, RES)).astype(np.float32)
    return images, conds, [s.caption for s in samples]


def tiny_base(captions: list[str], seed: int = 0):
    return build_tiny_components(build_tokenizer(captions, max_length=16), RES, seed=seed, preset=PRESET)


def test_embedding_channels_land_on_the_latent_grid() -> None:
    assert embedding_channels(8) == (16, 32, 96, 256)
    assert embedding_channels(4) == (16, 32, 96)
    with pytest.raises(ValueError):
        embedding_channels(6)


def test_base_saves_in_diffusers_layout_and_loads_with_stock_pipeline(tmp_path: Path, data) -> None:
    from diffusers import StableDiffusionPipeline

    base = tiny_base(data[2])
    base.save(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red sphere", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert out.shape == (1, RES, RES, 3)
    reloaded = load_base(tmp_path / "base")
    for a, b in zip(base.unet.state_dict().values(), reloaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_missing_weights_fail_with_instructions() -> None:
    with pytest.raises(BaseModelNotFoundError, match="huggingface-cli download"):
        load_base("runwayml/stable-diffusion-v1-5")


def _trainer(base, out: Path, steps: int, seed: int = 0, lr: float = 1e-3) -> LumenTrainer:
    settings = ControlTrainSettings(steps=steps, batch_size=4, lr=lr, warmup_steps=1, checkpoint_every=3,
                                    validate_every=1000, seed=seed)  # fmt: skip
    return LumenTrainer(base, build_controlnet(base, N, seed=1), out, settings)


def _fixed_loss(trainer: LumenTrainer, conds: np.ndarray) -> float:
    state = trainer.gen.get_state()
    trainer.gen.manual_seed(1234)
    idx = torch.arange(4)
    with torch.no_grad():
        loss = np.mean([
            trainer.loss_on(idx, torch.from_numpy(conds), torch.zeros(4, dtype=torch.bool),
                            torch.zeros(4, dtype=torch.bool)).item()
            for _ in range(8)
        ])  # fmt: skip
    trainer.gen.set_state(state)
    return float(loss)


def test_controlnet_training_reduces_the_loss_on_a_fixed_batch(tmp_path: Path, data) -> None:
    images, conds, captions = data
    trainer = _trainer(tiny_base(captions), tmp_path, steps=80, lr=3e-3)
    trainer._prepare(images, captions)
    before = _fixed_loss(trainer, conds)
    trainer.fit(images, conds, captions, progress=False)
    after = _fixed_loss(trainer, conds)
    assert after < 0.85 * before, (before, after)
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 81


def test_edge_weights_rise_on_condition_edges_and_are_one_on_flat_conditions() -> None:
    from pipeline.lumen.controlnet import edge_weights

    flat = torch.full((2, 3, 16, 16), 0.5)
    assert torch.equal(edge_weights(flat, (4, 4), 2.0), torch.ones(2, 1, 4, 4))
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0  # a vertical edge between columns 7 and 8: latent columns 1 and 2 hold it
    w = edge_weights(step, (4, 4), 2.0)
    assert w.shape == (1, 1, 4, 4) and w.mean().item() == pytest.approx(3.0)
    assert (w[..., 2] > 1).all() and (w[..., [0, 1, 3]] == 1).all()


def test_edge_weighted_loss_equals_the_plain_loss_on_flat_conditions(tmp_path: Path, data) -> None:
    images, conds, captions = data
    base = tiny_base(captions)
    plain = _trainer(base, tmp_path / "a", steps=1)
    weighted = _trainer(base, tmp_path / "b", steps=1)
    weighted.s.edge_weight = 4.0
    flat = np.full_like(conds, 0.5)
    for t in (plain, weighted):
        t._prepare(images, captions)
    assert _fixed_loss(weighted, flat) == pytest.approx(_fixed_loss(plain, flat), rel=1e-5)
    assert _fixed_loss(weighted, conds) != pytest.approx(_fixed_loss(plain, conds), rel=1e-4)


def test_checkpoint_kill_resume_matches_an_uninterrupted_run(tmp_path: Path, data) -> None:
    images, conds, captions = data
    straight = _trainer(tiny_base(captions), tmp_path / "a", steps=6)
    straight.fit(images, conds, captions, progress=False)

    first = _trainer(tiny_base(captions), tmp_path / "b", steps=6)
    first.fit(images, conds, captions, progress=False, stop_after=3)  # "killed" after the step-3 checkpoint
    resumed = _trainer(tiny_base(captions), tmp_path / "b", steps=6)
    assert resumed.resume() == 3
    exp_avg = [first.opt.state[p]["exp_avg"] for p in first.controlnet.parameters()]
    exp_avg_resumed = [resumed.opt.state[p]["exp_avg"] for p in resumed.controlnet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, exp_avg_resumed, strict=True))
    resumed.fit(images, conds, captions, progress=False)
    assert resumed.step == 6
    for a, b in zip(straight.controlnet.parameters(), resumed.controlnet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_n_channel_layout_runs_through_the_stock_pipeline(tmp_path: Path, data) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    images, conds, captions = data
    base = tiny_base(captions)
    trainer = _trainer(base, tmp_path / "train", steps=2)
    trainer.fit(images, conds, captions, progress=False)
    base.save(tmp_path / "base")
    trainer.save(tmp_path / "controlnet", {"condition": "layout", "channels": N})
    cn = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert cn.config.conditioning_channels == N
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "base", controlnet=cn)
    pipe.set_progress_bar_config(disable=True)

    def stock(seed: int, i: int) -> np.ndarray:
        img = pipe(
            captions[i],
            image=torch.from_numpy(conds[i : i + 1]),
            num_inference_steps=3,
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(seed),
            height=RES,
            width=RES,
            output_type="np",
        ).images
        return (np.clip(img[0], 0, 1) * 255).round().astype(np.uint8)  # fmt: skip

    a, b = stock(7, 0), stock(7, 0)
    assert a.shape == (RES, RES, 3) and np.array_equal(a, b)  # same seed, same image
    # our batched generator (2 images per call), fast path and stock-pipeline path, reproduces the stock
    # single-image calls
    expected = [stock(seed, i) for i, seed in enumerate([7, 8, 9])]
    for fast in (True, False):
        gen = LumenGenerator(load_base(tmp_path / "base"), cn, fast=fast)
        assert gen.fast == fast
        ours = gen.generate(conds[:3], captions[:3], [7, 8, 9], steps=3, guidance_scale=2.0, batch_size=2)
        for i in range(3):
            assert np.abs(ours[i].astype(int) - expected[i].astype(int)).max() <= 2


def test_variant_seeds_and_prompts_are_deterministic() -> None:
    assert variant_seed(0, "k", 1) == variant_seed(0, "k", 1) != variant_seed(0, "k", 2)
    specs = plan_variants(
        ["a", "b"], ["cap a", "cap b"], 3, run_seed=0, variation_prompts=["at night", "in snow"]
    )
    assert [s.out_key for s in specs[:3]] == ["a-v00", "a-v01", "a-v02"]
    assert [s.prompt for s in specs[:3]] == ["cap a, at night", "cap a, in snow", "cap a, at night"]
    assert len({s.seed for s in specs}) == 6


def test_sharpen_keeps_flat_layouts_and_steepens_boundaries() -> None:
    flat = np.full((1, 2, 8, 8), 0.3, np.float32)
    np.testing.assert_allclose(sharpen(flat, 2.0, 2), flat, atol=1e-6)
    step = np.zeros((2, 1, 8, 8), np.float32)
    step[..., 4:] = 1.0
    out = sharpen(step, 1.0, 1)
    assert out.shape == step.shape and out.dtype == np.float32
    assert out[0, 0, 0, 4] > 1.0 and out[0, 0, 0, 3] < 0.0  # both sides of the boundary pushed apart
    np.testing.assert_allclose(out[..., :2], 0.0, atol=1e-6)  # away from the boundary: unchanged
    np.testing.assert_allclose(out[..., 6:], 1.0, atol=1e-6)
    # against a direct box filter: 3x3 mean with replicated borders
    rng = np.random.default_rng(0)
    c = rng.random((1, 1, 5, 5)).astype(np.float32)
    padded = np.pad(c[0, 0], 1, mode="edge")
    blur = np.mean([padded[dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)], axis=0)
    np.testing.assert_allclose(sharpen(c, 0.5, 1)[0, 0], c[0, 0] + 0.5 * (c[0, 0] - blur), atol=1e-5)
    assert np.array_equal(sharpen(c, 0.0, 4), c)


def test_outline_sharpen_sharpens_only_the_band_around_label_outlines() -> None:
    rng = np.random.default_rng(0)
    conds = rng.random((2, 3, 16, 16)).astype(np.float32)
    outlines = np.zeros((2, 8, 8), bool)
    outlines[0, 4, :] = True  # one row at the labels' size = rows 8-9 at the model size
    out = outline_sharpen(conds, outlines, 2.0, 1, 1)
    assert out.shape == conds.shape and out.dtype == np.float32
    full = sharpen(conds, 2.0, 1)
    np.testing.assert_allclose(out[0, :, 7:11], full[0, :, 7:11], atol=1e-6)  # rows 8-9, widened by 1 px
    np.testing.assert_allclose(out[0, :, :7], conds[0, :, :7], atol=1e-6)
    np.testing.assert_allclose(out[0, :, 11:], conds[0, :, 11:], atol=1e-6)
    np.testing.assert_allclose(out[1], conds[1], atol=1e-6)  # no outlines: unchanged
    assert np.array_equal(outline_sharpen(conds, outlines, 0.0, 1, 1), conds)
    with pytest.raises(ValueError, match="outlines must be"):
        outline_sharpen(conds, outlines[0], 2.0, 1, 1)


def test_guided_filter_moves_a_layout_ramp_onto_the_image_edge() -> None:
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, :, :16] = (200, 30, 30)  # a red object left of x = 16, a green one right of it
    image[0, :, 16:] = (30, 200, 30)
    ramp = np.broadcast_to(np.clip((np.arange(32) - 8) / 16, 0, 1), (1, 1, 32, 32)).astype(np.float32)
    out = guided_filter(ramp, image, 4, 1e-3)
    assert out.shape == ramp.shape and out.dtype == np.float32
    jump = out[0, 0, 0, 16] - out[0, 0, 0, 15]
    assert ramp[0, 0, 0, 16] - ramp[0, 0, 0, 15] == 1 / 16 and jump > 0.3  # 1/16 per px becomes a step
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6  # no overshoot (unlike unsharp masking)
    flat = np.full((2, 3, 32, 32), 0.3, np.float32)
    np.testing.assert_allclose(guided_filter(flat, np.repeat(image, 2, 0), 4, 1e-2), flat, atol=1e-6)
    # a guide without edges fits nothing: the filter is then two window means
    grey = np.full((1, 32, 32, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    noise = rng.random((1, 1, 32, 32)).astype(np.float32)
    padded = np.pad(noise[0, 0], 1, mode="constant", constant_values=np.nan)
    once = np.nanmean([padded[dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)], axis=0)
    padded = np.pad(once, 1, mode="constant", constant_values=np.nan)
    twice = np.nanmean([padded[dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)], axis=0)
    np.testing.assert_allclose(guided_filter(noise, grey, 1, 1e-2)[0, 0], twice, atol=1e-5)
    with pytest.raises(ValueError, match="guides must be"):
        guided_filter(ramp, image[:, :16], 4, 1e-3)


def test_sparse_masking_hides_the_configured_share_per_class() -> None:
    rng = np.random.default_rng(0)
    seg = np.zeros((64, 64), np.uint8)
    seg[:, 20:40] = 1
    seg[40:, 40:] = 2
    keep = sparse_mask(seg, rng, min_share=0.5, max_share=0.5)
    for cls in (0, 1, 2):
        hidden = 1 - keep[seg == cls].mean()
        assert abs(hidden - 0.5) < 0.01
    shares = [1 - sparse_mask(seg, np.random.default_rng(s), 0.2, 0.8)[seg == 1].mean() for s in range(20)]
    assert min(shares) >= 0.2 - 0.01 and max(shares) <= 0.8 + 0.01 and np.std(shares) > 0.05


def test_comparison_conditions_have_the_right_shape_and_range() -> None:
    s = ToyScenes(num_images=1, image_size=(32, 32)).load("toy-train-000000")
    onehot = seg_onehot(s.seg, 6)
    assert onehot.shape == (6, 32, 32) and np.array_equal(onehot.sum(0), np.ones((32, 32)))
    assert np.array_equal(onehot.argmax(0), s.seg)
    e, d = edge_map(s.image), depth_map(s.depth)
    assert e.shape == d.shape == (1, 32, 32)
    assert set(np.unique(e)) <= {0.0, 1.0} and d.min() >= 0 and d.max() <= 1
    assert np.all(d[0][s.depth == 0] == 0)


def test_train_base_writes_a_stock_loadable_model_and_resumes(tmp_path: Path, data) -> None:
    import csv

    from diffusers import StableDiffusionPipeline

    from pipeline.lumen.train_base import BaseTrainSettings, train_base

    images, _, captions = data
    s = BaseTrainSettings(resolution=RES, vae_steps=4, vae_batch_size=2, vae_crop=8, unet_steps=4, batch_size=2,
                          warmup_steps=1, checkpoint_every=2)  # fmt: skip
    train_base(images, captions, tmp_path, s, preset=PRESET, progress=False, sample_prompts=captions[:1])
    assert (tmp_path / "samples.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the training latents
    assert pipe.tokenizer("a red sphere").input_ids[1] != pipe.tokenizer.unk_token_id
    # a longer run in the same folder resumes both phases from their checkpoints
    train_base(images, captions, tmp_path, BaseTrainSettings(**{**s.__dict__, "unet_steps": 6}), preset=PRESET,
               progress=False, sample_prompts=captions[:1])  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    unet_steps = [int(r["step"]) for r in rows if r["phase"] == "unet"]
    assert unet_steps[-1] == 5 and unet_steps.count(0) == 1  # steps 4-5 were added, none redone
    assert [r for r in rows if r["phase"] == "vae"][-1]["step"] == "3"


def test_a_resumed_run_logs_each_step_once(tmp_path: Path, data) -> None:
    """Steps logged after the last checkpoint of a killed run are dropped when it resumes from it."""
    images, conds, captions = data
    first = _trainer(tiny_base(captions), tmp_path, steps=6)
    first.fit(images, conds, captions, progress=False, stop_after=4)  # checkpoint at 3, "killed" after 4
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 5
    resumed = _trainer(tiny_base(captions), tmp_path, steps=6)
    resumed.fit(images, conds, captions, progress=False)
    steps = [row.split(",")[0] for row in (tmp_path / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]
