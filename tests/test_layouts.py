"""Neural layouts: backbones, streaming PCA, projection, cache, preview, CLI. Tiny seeded models only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, LayoutConfig, build_config
from pipeline.data.toyscenes import ToyScenes
from pipeline.layouts import (
    PCA,
    LayoutCache,
    LayoutExtractor,
    PCAFitter,
    SDBackbone,
    SDComponents,
    ViTBackbone,
    build_backbone,
    fit_pca,
    images_to_tensor,
    layout_to_rgb,
    save_preview,
)
from pipeline.layouts.tiny_sd import tiny_sd_components

SIZE = 32


@pytest.fixture(scope="module")
def components() -> SDComponents:
    return tiny_sd_components(
        seed=0,
        sample_size=SIZE,
        block_out_channels=(8, 16),
        vae_block_out_channels=(8, 16),
        norm_num_groups=4,
        text_hidden_size=16,
    )


@pytest.fixture(scope="module")
def toy() -> ToyScenes:
    return ToyScenes(num_images=6, image_size=(SIZE, SIZE), seed=3)


@pytest.fixture(scope="module")
def images(toy: ToyScenes) -> torch.Tensor:
    return images_to_tensor([toy.load(k).image for k in toy.keys()[:4]])


def _vit(name: str) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    common = {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "image_size": SIZE,
        "patch_size": 8,
    }
    if name == "dinov2":
        return Dinov2Model(Dinov2Config(**common))
    if name == "dino":
        return ViTModel(ViTConfig(**common), add_pooling_layer=False)
    return CLIPVisionModel(CLIPVisionConfig(**common))


def _fit(backbone: SDBackbone | ViTBackbone, images: torch.Tensor, n: int) -> PCA:
    fitter = PCAFitter(vectors_per_image=None, seed=0)
    fitter.update(backbone(images))
    return fitter.fit(n, metadata={"backbone": backbone.spec()})


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape"),
    [("up_blocks.1", (8, 16, 16)), ("up_blocks.0", (16, 16, 16)), ("mid_block", (16, 8, 8))],
)
def test_sd_backbone_reads_the_hooked_block(
    components: SDComponents, images: torch.Tensor, layer: str, shape: tuple[int, int, int]
) -> None:
    """The sd backbone returns the named UNet block's output, (B, C, h, w) float32."""
    feats = SDBackbone(components, layer=layer)(images[:2])
    assert feats.shape == (2, *shape)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_sd_features_do_not_depend_on_the_batch(components: SDComponents, images: torch.Tensor) -> None:
    """Fixed seeded noise: an image's features are the same alone or in a batch, and on every call."""
    backbone = SDBackbone(components)
    together = backbone(images)
    alone = backbone(images[2:3])
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backbone(images), together)


def test_sd_features_change_with_timestep_prompt_and_noise_draws(
    components: SDComponents, images: torch.Tensor
) -> None:
    """Timestep, prompt and the number of noise draws all reach the features."""
    base = SDBackbone(components, timestep=261)(images[:2])
    assert not torch.allclose(base, SDBackbone(components, timestep=50)(images[:2]))
    assert not torch.allclose(base, SDBackbone(components, noise_draws=2)(images[:2]))
    captioned = SDBackbone(components)(images[:2], prompts=["a red sphere", "a box on a wooden floor"])
    assert not torch.allclose(base, captioned)


def test_sd_backbone_rejects_bad_layer_and_timestep(components: SDComponents) -> None:
    """Errors name the valid blocks and the valid timestep range."""
    with pytest.raises(ValueError, match=r"up_blocks\.1"):
        SDBackbone(components, layer="up_blocks.7")
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        SDBackbone(components, timestep=1000)


def test_sd_input_size_rounds_to_the_model_stride(components: SDComponents, images: torch.Tensor) -> None:
    """input_size sets the shorter side; sizes are rounded to what the VAE and UNet accept."""
    backbone = SDBackbone(components, input_size=48)
    assert backbone.input_size(SIZE, SIZE) == (48, 48)
    assert backbone.input_size(30, 45) == (48, 72)
    assert backbone(images[:1]).shape == (1, 8, 24, 24)


def test_sd_backbone_from_a_diffusers_folder(
    components: SDComponents, images: torch.Tensor, tmp_path: Path
) -> None:
    """build_backbone loads a diffusers folder offline and gives the same features as the in-memory model."""
    folder = components.save_pretrained(tmp_path / "base")
    from_folder = build_backbone(LayoutConfig(), base_model_dir=folder)
    in_memory = build_backbone(LayoutConfig(), components=components)
    assert from_folder.spec()["weights"] == in_memory.spec()["weights"]
    assert from_folder.spec()["model"] == str(folder)
    torch.testing.assert_close(from_folder(images[:2]), in_memory(images[:2]), atol=1e-5, rtol=1e-4)


def test_sd_fingerprint_follows_the_encoder_not_the_decoder(components: SDComponents) -> None:
    """A decoder fine-tune keeps the latents, so the features and every PCA fitted on them stay valid."""
    import copy

    before = SDBackbone(components).spec()["weights"]
    tuned = copy.deepcopy(components)
    with torch.no_grad():
        next(tuned.vae.decoder.parameters()).add_(0.1)
    assert SDBackbone(tuned).spec()["weights"] == before
    with torch.no_grad():
        next(tuned.vae.encoder.parameters()).add_(0.1)
    assert SDBackbone(tuned).spec()["weights"] != before


def test_sd_backbone_without_a_model_says_how_to_provide_one() -> None:
    with pytest.raises(ValueError, match=r"layouts\.model"):
        build_backbone(LayoutConfig())


@pytest.mark.parametrize("name", ["dinov2", "dino", "clip"])
def test_vit_backbone_shapes(name: str, images: torch.Tensor) -> None:
    """Patch tokens come back on the patch grid, for square and non-square inputs and any layer."""
    model = _vit(name)
    cfg = LayoutConfig(backbone=name)
    backbone = build_backbone(cfg, components=model)
    assert backbone(images[:2]).shape == (2, 16, 4, 4)
    assert backbone(torch.rand(1, 3, SIZE, 48)).shape == (1, 16, 4, 6)
    first = build_backbone(cfg.model_copy(update={"layer": 0, "input_size": 64}), components=model)
    assert first(images[:1]).shape == (1, 16, 8, 8)
    assert first.spec()["layer"] == 0 and first.spec()["input_size"] == 64


def test_vit_backbone_loads_a_local_folder(images: torch.Tensor, tmp_path: Path) -> None:
    """A model id may be a folder written by save_pretrained; it loads offline with the same weights."""
    model = _vit("dinov2")
    model.save_pretrained(tmp_path / "dinov2")
    cfg = LayoutConfig(backbone="dinov2", model=str(tmp_path / "dinov2"))
    loaded, in_memory = build_backbone(cfg), build_backbone(cfg, components=model)
    assert loaded.spec()["weights"] == in_memory.spec()["weights"]
    torch.testing.assert_close(loaded(images[:1]), in_memory(images[:1]))


def test_vit_backbone_rejects_out_of_range_layer() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ViTBackbone("dinov2", _vit("dinov2"), layer=5)


def test_vit_missing_weights_error_tells_how_to_provide_them(tmp_path: Path) -> None:
    """No download is attempted; the error says how to get the weights."""
    cfg = LayoutConfig(backbone="dinov2", model=str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        build_backbone(cfg)


def test_backbone_registry_lists_valid_names() -> None:
    bogus = LayoutConfig().model_copy(update={"backbone": "resnet"})
    with pytest.raises(KeyError, match="dinov2"):
        build_backbone(bogus)


def test_backbones_reject_uint8_images(components: SDComponents) -> None:
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        SDBackbone(components)(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))


def test_layout_config_checks_layer_type_per_backbone() -> None:
    with pytest.raises(ConfigError, match="by name"):
        build_config({"layouts": {"backbone": "sd", "layer": 3}})
    with pytest.raises(ConfigError, match="by index"):
        build_config({"layouts": {"backbone": "dinov2", "layer": "up_blocks.1"}})
    assert build_config({"layouts": {"backbone": "clip", "layer": -2}}).layouts.layer == -2


# --------------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------------


def _planted(m: int = 4000, c: int = 24, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Data (m, c) = mean + low-rank signal in a random k-dim subspace + small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(c, k, generator=g, dtype=torch.float64))[0].T  # (k, c)
    z = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.tensor(
        [5.0, 3.0, 2.0][:k], dtype=torch.float64
    )
    x = 7.0 + z @ basis + 0.05 * torch.randn(m, c, generator=g, dtype=torch.float64)
    return x.float(), basis


def _max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the row spaces of a and b."""
    qa = torch.linalg.qr(a.double().T)[0]
    qb = torch.linalg.qr(b.double().T)[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return float(torch.arccos(cosines.min()))


def test_pca_recovers_a_planted_subspace() -> None:
    """Streaming fit (in chunks) finds the planted 3-dim subspace: principal angles near 0."""
    x, basis = _planted()
    fitter = PCAFitter()
    for chunk in x.split(512):
        fitter.update_vectors(chunk)
    pca = fitter.fit(3)
    assert _max_principal_angle(pca.components, basis) < 1e-2
    torch.testing.assert_close(pca.mean, x.mean(0), atol=1e-4, rtol=0)


def test_pca_recovers_a_planted_subspace_from_sampled_feature_maps() -> None:
    """update() samples a bounded number of vectors per map and still finds the subspace."""
    x, basis = _planted(m=16 * 400)
    maps = x.reshape(16, 20, 20, -1).permute(0, 3, 1, 2)  # (B, C, h, w)
    fitter = PCAFitter(vectors_per_image=100, seed=1)
    for batch in maps.split(4):
        fitter.update(batch)
    assert fitter.num_vectors == 16 * 100 and fitter.num_images == 16
    assert _max_principal_angle(fitter.fit(3).components, basis) < 2e-2


def test_pca_transform_variance_equals_explained_variance() -> None:
    x, _ = _planted()
    fitter = PCAFitter()
    fitter.update_vectors(x)
    pca = fitter.fit(5)
    projected = pca.transform(x)
    torch.testing.assert_close(projected.var(0), pca.explained_variance, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(projected.mean(0), torch.zeros(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(pca.scale, pca.explained_variance.sqrt())


def test_pca_streaming_equals_one_shot() -> None:
    x, _ = _planted(m=1000)
    one, many = PCAFitter(), PCAFitter()
    one.update_vectors(x)
    for chunk in x.split(77):
        many.update_vectors(chunk)
    a, b = one.fit(4), many.fit(4)
    torch.testing.assert_close(a.components, b.components, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.explained_variance, b.explained_variance, atol=1e-4, rtol=1e-5)


def test_extended_pca_keeps_its_components_and_adds_the_next_ones() -> None:
    """Components fitted on the residual of a 3-component PCA are the data's 4th and 5th: the extended
    PCA equals a 5-component fit (up to sign), and its first 3 projections are the old ones (to float rounding)."""
    x, _ = _planted(m=3000)
    fitter = PCAFitter()
    fitter.update_vectors(x)
    pca, full = fitter.fit(3), fitter.fit(5)
    maps = x[:400].reshape(4, 10, 10, -1).permute(0, 3, 1, 2)
    residual = pca.residual(x)
    torch.testing.assert_close(residual @ pca.components.T, torch.zeros(len(x), 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.residual(maps), residual[:400].reshape(4, 10, 10, -1).permute(0, 3, 1, 2))
    rest = PCAFitter()
    rest.update_vectors(residual)
    wide = pca.extended(rest.fit(2))
    assert wide.num_components == 5 and wide.metadata["extended"]["extra"] == 2
    assert wide.metadata["explained_variance_ratio"][:3] == pca.metadata["explained_variance_ratio"]
    np.testing.assert_allclose(
        wide.metadata["explained_variance_ratio"], full.metadata["explained_variance_ratio"], rtol=1e-3
    )
    cos = (wide.components * full.components).sum(1).abs()
    torch.testing.assert_close(cos, torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(wide.explained_variance, full.explained_variance, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(wide.transform(maps)[:, :3], pca.transform(maps), atol=1e-5, rtol=1e-6)
    raw = PCAFitter()
    raw.update_vectors(x)
    with pytest.raises(ValueError, match="residual"):
        pca.extended(raw.fit(2))  # fitted on the features, not the residual: same directions again


def test_pca_drop_first_skips_leading_components() -> None:
    x, _ = _planted()
    fitter = PCAFitter()
    fitter.update_vectors(x)
    full, dropped = fitter.fit(4), fitter.fit(2, drop_first=2)
    torch.testing.assert_close(dropped.components, full.components[2:4])
    assert dropped.metadata["drop_first"] == 2


def test_pca_rejects_more_components_than_channels() -> None:
    fitter = PCAFitter()
    fitter.update_vectors(torch.randn(50, 6))
    with pytest.raises(ValueError, match="C=6"):
        fitter.fit(5, drop_first=2)


def test_pca_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    x, _ = _planted(m=500)
    fitter = PCAFitter()
    fitter.update_vectors(x)
    pca = fitter.fit(3, metadata={"backbone": {"name": "sd", "layer": "up_blocks.1"}})
    path = pca.save(tmp_path / "pca.safetensors", metadata={"config_hash": "abc"})
    loaded = PCA.load(path)
    for name, tensor in pca.tensors().items():
        assert torch.equal(tensor, getattr(loaded, name)), name
    assert loaded.metadata == json.loads(json.dumps(pca.metadata))
    assert loaded.metadata["config_hash"] == "abc" and loaded.fingerprint() == pca.fingerprint()


# --------------------------------------------------------------------------------------------------
# Projection, dataset fit
# --------------------------------------------------------------------------------------------------


def test_layouts_are_n_channels_in_unit_range_at_the_requested_size(
    components: SDComponents, images: torch.Tensor
) -> None:
    backbone = SDBackbone(components)
    pca = _fit(backbone, images, 3)
    layouts = LayoutExtractor(backbone, pca)(images)
    assert layouts.shape == (4, 3, SIZE, SIZE)
    assert layouts.min() >= 0 and layouts.max() <= 1
    assert 0.3 < float(layouts.mean()) < 0.7  # centred at 0.5
    assert LayoutExtractor(backbone, pca, size=(24, 40))(images[:1]).shape == (1, 3, 24, 40)


def test_layouts_for_handles_mixed_image_sizes(components: SDComponents, toy: ToyScenes) -> None:
    """Samples of different sizes are batched by size; each layout matches its own image."""
    small = [toy.load(k) for k in toy.keys()[:2]]
    large = ToyScenes(num_images=1, image_size=(48, 64), seed=3).load("toy-train-000000")
    backbone = SDBackbone(components)
    extractor = LayoutExtractor(backbone, _fit(backbone, images_to_tensor([s.image for s in small]), 3))
    layouts = extractor.layouts_for([small[0], large, small[1]])
    assert [x.shape for x in layouts] == [(3, SIZE, SIZE), (3, 48, 64), (3, SIZE, SIZE)]


def test_projection_normalises_and_clips() -> None:
    """A component at +clip_sigma std maps to 1, at the mean to 0.5, beyond the clip stays at the bound."""
    pca = PCA(torch.zeros(2), torch.eye(2)[:1], torch.tensor([4.0]))  # scale 2
    extractor = LayoutExtractor(backbone=None, pca=pca, clip_sigma=3.0)  # type: ignore[arg-type]
    feats = torch.tensor([0.0, 6.0, -6.0, 100.0]).view(1, 1, 1, 4)
    feats = torch.cat([feats, torch.zeros_like(feats)], 1)
    torch.testing.assert_close(extractor.project(feats).flatten(), torch.tensor([0.5, 1.0, 0.0, 1.0]))


def test_fit_pca_over_a_dataset_is_bounded_and_records_metadata(
    components: SDComponents, toy: ToyScenes
) -> None:
    cfg = LayoutConfig(num_components=4, pca_images=5, pca_vectors_per_image=10, batch_size=2)
    backbone = build_backbone(cfg, components=components)
    pca = fit_pca(backbone, toy, cfg, metadata={"config_hash": "h"})
    meta = pca.metadata
    assert pca.num_components == 4 and meta["num_images"] == 5 and meta["num_vectors"] == 50
    assert meta["backbone"] == backbone.spec() and meta["timestep"] == 261 and meta["layer"] == "up_blocks.1"
    assert meta["dataset"] == "toyscenes" and meta["config_hash"] == "h"
    extractor = LayoutExtractor.from_config(cfg, backbone, pca)
    with pytest.raises(ValueError, match="num_components"):
        LayoutExtractor.from_config(cfg.model_copy(update={"num_components": 5}), backbone, pca)
    assert extractor.num_components == 4


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class _Counting:
    """Wraps a backbone and counts images passed through it."""

    def __init__(self, backbone: SDBackbone) -> None:
        self.backbone, self.images = backbone, 0

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.images += images.shape[0]
        return self.backbone(images, prompts)

    def spec(self) -> dict[str, object]:
        return self.backbone.spec()


def test_cache_round_trip_and_reuse(components: SDComponents, toy: ToyScenes, tmp_path: Path) -> None:
    """Layouts are stored as float16 and reused; cached and fresh layouts are identical."""
    samples = [toy.load(k) for k in toy.keys()[:3]]
    backbone = SDBackbone(components)
    counting = _Counting(backbone)
    extractor = LayoutExtractor(counting, _fit(backbone, images_to_tensor([s.image for s in samples]), 3))  # type: ignore[arg-type]
    cache = LayoutCache(tmp_path, extractor.spec())
    fresh = extractor.layouts_for(samples, cache)
    assert counting.images == 3
    assert np.load(cache.path(samples[0].key)).dtype == np.float16
    again = extractor.layouts_for(samples, cache)
    assert counting.images == 3  # nothing recomputed
    for a, b in zip(fresh, again, strict=True):
        assert a.shape == (3, SIZE, SIZE) and np.array_equal(a, b)
    assert cache.keys() == sorted(s.key for s in samples)
    assert json.loads((cache.directory / "spec.json").read_text())["hash"] == cache.spec_hash


@pytest.mark.parametrize("change", ["num_components", "layer", "timestep"])
def test_cache_is_invalidated_when_the_spec_changes(
    components: SDComponents, toy: ToyScenes, tmp_path: Path, change: str
) -> None:
    """Changing N, layer or timestep gives a new spec hash: the old layouts are not returned."""
    samples = [toy.load(k) for k in toy.keys()[:2]]
    x = images_to_tensor([s.image for s in samples])
    settings = {"num_components": 3, "layer": "up_blocks.1", "timestep": 261}
    old = LayoutExtractor(backbone := SDBackbone(components), _fit(backbone, x, 3))
    LayoutCache(tmp_path, old.spec()).put(samples[0].key, old(x[:1])[0])
    settings[change] = {"num_components": 4, "layer": "up_blocks.0", "timestep": 100}[change]
    changed_backbone = SDBackbone(
        components, layer=str(settings["layer"]), timestep=int(settings["timestep"])
    )
    new = LayoutExtractor(changed_backbone, _fit(changed_backbone, x, int(settings["num_components"])))
    assert new.spec_hash() != old.spec_hash()
    new_cache = LayoutCache(tmp_path, new.spec())
    assert new_cache.get(samples[0].key) is None
    assert samples[0].key in LayoutCache(tmp_path, old.spec())
    layouts = new.layouts_for(samples[:1], new_cache)
    assert layouts[0].shape[0] == settings["num_components"]


def test_cache_treats_a_corrupt_file_as_missing(tmp_path: Path) -> None:
    cache = LayoutCache(tmp_path, {"num_components": 2})
    cache.put("k", np.ones((2, 4, 4)))
    assert cache.get("k") is not None
    cache.path("k").write_bytes(b"")
    assert cache.get("k") is None


def test_cache_rejects_a_layout_with_the_wrong_channel_count(tmp_path: Path) -> None:
    cache = LayoutCache(tmp_path, {"num_components": 3})
    with pytest.raises(ValueError, match="spec says 3"):
        cache.put("a-key", np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="invalid sample key"):
        cache.path("bad.key")


# --------------------------------------------------------------------------------------------------
# Preview and CLI
# --------------------------------------------------------------------------------------------------


def test_layout_to_rgb_handles_any_n() -> None:
    for n in (1, 2, 5):
        rgb = layout_to_rgb(np.random.default_rng(0).random((2, n, 8, 8)))
        assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
    assert layout_to_rgb(np.zeros((3, 8, 8)), stretch=False).shape == (8, 8, 3)


def test_preview_png_shows_input_and_layout(toy: ToyScenes, tmp_path: Path) -> None:
    samples = [toy.load(k) for k in toy.keys()[:2]]
    layouts = [np.random.default_rng(i).random((4, SIZE, SIZE)).astype(np.float32) for i in range(2)]
    path = save_preview(tmp_path / "p.png", [s.image for s in samples], layouts, [s.seg for s in samples], 6)
    with Image.open(path) as im:
        width, height = im.size
    assert width > 3 * 128 and height > 2 * 128  # 3 columns, 2 rows of >= 128 px tiles


def test_cli_layouts_preview_writes_png_and_pca(tmp_path: Path) -> None:
    from lumen_cli.layouts import register

    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\ndevice: cpu\nbase: {{resolution: 32}}\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    overrides = [
        "data.num_images=3",
        "data.image_size=32",
        "layouts.pca_images=3",
        "layouts.num_components=3",
    ]
    args = parser.parse_args(
        ["layouts", "preview", str(config), *overrides, "--out", str(tmp_path / "out"), "--num", "2"]
    )
    assert args.func(args) == 0
    pca = PCA.load(tmp_path / "out" / "pca.safetensors")
    assert pca.num_components == 3 and pca.metadata["model"] == "tiny-random-sd"
    assert pca.metadata["backbone"]["model"] == "tiny-random-sd"
    with Image.open(tmp_path / "out" / "preview.png") as im:
        assert im.size[1] > 2 * 128


def test_cli_layouts_preview_of_proxy_masks_shows_image_proxy_and_seg(tmp_path: Path) -> None:
    from lumen_cli.layouts import register
    from pipeline.layouts import KMeans
    from pipeline.layouts.preview import proxy_to_rgb
    from pipeline.viz import colorize_seg

    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\ndevice: cpu\nbase: {{resolution: 32}}\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    overrides = ["data.num_images=3", "data.image_size=32", "layouts.pca_images=3", "layouts.kind=clustered",
                 "layouts.num_clusters=4"]  # fmt: skip
    args = parser.parse_args(
        ["layouts", "preview", str(config), *overrides, "--out", str(tmp_path / "out"), "--num", "2"]
    )
    assert args.func(args) == 0
    kmeans = KMeans.load(tmp_path / "out" / "kmeans.safetensors")
    assert kmeans.num_clusters == 4 and kmeans.metadata["backbone"]["model"] == "tiny-random-sd"
    assert not (tmp_path / "out" / "pca.safetensors").exists()
    with Image.open(tmp_path / "out" / "preview.png") as im:
        width, height = im.size
    assert width > 3 * 128 and height > 2 * 128  # image | proxy mask | seg, 2 rows
    one_hot = np.eye(4, dtype=np.float32)[np.array([[0, 1], [2, 3]])].transpose(2, 0, 1)
    assert np.array_equal(proxy_to_rgb(one_hot), colorize_seg(np.array([[0, 1], [2, 3]]), 4))
