"""Typed configuration for every stage, YAML loading with ``key.sub=value`` overrides, stable hashing.

A run is described by one :class:`LumenConfig`. It is loaded from a YAML file with
:func:`load_config`, optionally patched by dotted overrides from the command line, validated by
pydantic (unknown keys are rejected with the list of valid ones) and written, resolved, into the run
folder with :func:`save_config`. :func:`config_hash` is a stable content hash used in provenance and
cache keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.io import atomic_write_text

if TYPE_CHECKING:
    from pipeline.data.labels import LabelMap

__all__ = [
    "BaseModelConfig",
    "ClassEditConfig",
    "ConfigError",
    "ControlsConfig",
    "DataConfig",
    "GainsConfig",
    "GenerateConfig",
    "LayoutConfig",
    "LumenConfig",
    "LumenTrainConfig",
    "MapperConfig",
    "PerceptionConfig",
    "RunnerConfig",
    "ShardConfig",
    "apply_overrides",
    "config_hash",
    "gains_setting_configs",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and how to fix it."""


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Where samples come from. ``adapter`` picks the dataset adapter by name."""

    adapter: Literal["toyscenes", "folder", "camvid", "webdataset"] = "toyscenes"
    root: Path | None = Field(None, description="dataset folder (folder, camvid, webdataset adapters)")
    split: Literal["train", "val"] = "train"
    num_images: int | None = Field(256, ge=1, description="cap on the number of samples; null = all")
    num_val_images: int | None = Field(64, ge=1, description="cap on validation samples; null = all")
    image_size: tuple[int, int] | None = Field(
        (128, 128), description="(height, width) samples are rendered or resized to; null = native size"
    )
    seed: int = 0
    load_workers: int = Field(1, ge=1, description="processes that load/render samples for model training")
    # toyscenes
    domains: list[str] = Field(default_factory=lambda: ["day", "evening", "studio"])
    min_objects: int = Field(2, ge=0)
    max_objects: int = Field(5, ge=0)
    # folder
    image_dir: str = "images"
    seg_dir: str | None = "seg"
    depth_dir: str | None = "depth"
    normal_dir: str | None = "normal"
    val_image_dir: str | None = None
    val_seg_dir: str | None = None
    val_depth_dir: str | None = None
    val_normal_dir: str | None = None
    depth_scale: float = Field(1000.0, gt=0, description="PNG16 depth value per metre (1000 = millimetres)")
    max_image_pixels: int = Field(
        8192 * 8192, ge=1, description="width x height cap of image and label files, checked before decoding"
    )
    high_bit_depth: Literal["scale", "quarantine"] = Field(
        "scale", description="16-bit greyscale images: scale to 8 bits, or quarantine them"
    )
    val_fraction: float | None = Field(
        0.1,
        gt=0,
        lt=1,
        description="folder adapter without data.val_image_dir: share of the training folder held out as "
        "the val split, chosen by a hash of each key (stable when files are added); null = no val split",
    )
    # folder / camvid / webdataset
    classes: list[str] | None = Field(None, description="class names, index = class id (seg labels)")
    ignore_index: int | None = Field(None, description="seg id of unlabelled pixels (ignored by losses)")
    label_map: dict[int | str, int | str] | None = Field(
        None,
        description="folder adapter: stored mask value or RGB colour -> class (name or id), e.g. "
        '{0: background, 255: foreground} or {"#804080": road}; every value a mask holds must be mapped '
        "(or listed in ignore_values). null = masks hold class ids",
    )
    ignore_values: list[int | str] = Field(
        default_factory=list,
        description="folder adapter: stored mask values (or colours) that mark unlabelled pixels; they "
        "become data.ignore_index",
    )

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 8 or v[1] < 8):
            raise ValueError(f"image_size must be at least 8x8, got {v}")
        return v

    @field_validator("label_map")
    @classmethod
    def _label_keys(cls, v: dict[int | str, int | str] | None) -> dict[int | str, int | str] | None:
        """Canonical keys (an int, or ``"#rrggbb"``), so a saved and reloaded config is the same."""
        from pipeline.data.labels import parse_label_key

        if v is None:
            return None
        out: dict[int | str, int | str] = {}
        for key, value in v.items():
            canon = parse_label_key(key, f"data.label_map key {key!r}")
            if canon in out:
                raise ValueError(f"data.label_map lists {canon!r} twice (as {key!r})")
            out[canon] = value
        return out

    @field_validator("ignore_values")
    @classmethod
    def _ignore_keys(cls, v: list[int | str]) -> list[int | str]:
        from pipeline.data.labels import parse_label_key

        return [parse_label_key(x, f"data.ignore_values entry {x!r}") for x in v]

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.adapter in ("folder", "camvid", "webdataset") and self.root is None:
            raise ValueError(f"adapter '{self.adapter}' needs data.root (the dataset folder)")
        if (self.label_map or self.ignore_values) and self.adapter != "folder":
            raise ValueError(
                f"data.label_map and data.ignore_values are read by the folder adapter; the {self.adapter} "
                "adapter has its own class ids (remove them, or use data.adapter=folder)"
            )
        self.labels()  # raises naming the key
        return self

    def labels(self) -> LabelMap | None:
        """The parsed :class:`~pipeline.data.labels.LabelMap` of ``label_map`` / ``ignore_values``."""
        from pipeline.data.labels import LabelMap

        return LabelMap.from_config(self.label_map, self.ignore_values, self.classes, self.ignore_index)


class LayoutConfig(_Section):
    """How neural layouts are made: backbone features reduced by a dataset-level PCA, or clustered into
    proxy masks by k-means (``kind: clustered``) (docs/layouts.md)."""

    kind: Literal["pca", "clustered"] = Field(
        "pca",
        description="pca: N principal components (the LUMEN layout); clustered: the K-channel proxy mask of "
        "a dataset-level k-means of the same features",
    )
    backbone: Literal["sd", "dinov2", "dino", "clip"] = "sd"
    model: str | None = Field(
        None,
        description="hub id or local folder (loaded with local_files_only); null = the run's base model (sd) "
        "or the backbone's default id (dinov2: facebook/dinov2-base, dino: facebook/dino-vitb16, "
        "clip: openai/clip-vit-base-patch16)",
    )
    layer: str | int | None = Field(
        None,
        description="sd: UNet submodule whose output is read, e.g. up_blocks.1 (null = up_blocks.1); "
        "vit: hidden-state index, 0 = patch embeddings, -1 = last (null = -1)",
    )
    timestep: int = Field(261, ge=0, le=999, description="sd: diffusion timestep at which features are read")
    noise_draws: int = Field(1, ge=1, description="sd: features are averaged over this many noise draws")
    prompt: Literal["empty", "caption"] = Field("empty", description="sd: text condition of the UNet")
    num_components: int = Field(8, ge=1, description="N, the layout channels (1 <= N <= feature channels)")
    drop_first: int = Field(0, ge=0, description="skip the first k principal components")
    num_clusters: int = Field(16, ge=2, description="clustered: K, the proxy-mask channels")
    soft_temperature: float | None = Field(
        None, gt=0, description="clustered: soft assignments softmax(-distance / T); null = one-hot"
    )
    pca_images: int = Field(64, ge=1, description="images sampled to fit the PCA (or the k-means)")
    pca_vectors_per_image: int = Field(
        256, ge=1, description="feature vectors sampled per image for the PCA (or the k-means)"
    )
    clip_sigma: float = Field(
        3.0, gt=0, description="components are clipped at +-clip_sigma std, then mapped to [0, 1]"
    )
    input_size: int | None = Field(
        None,
        description="backbone input: the shorter image side is resized to this (both sides then rounded to "
        "the backbone's stride); null = the image size",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="backbone compute dtype; auto = float16 on CUDA, float32 elsewhere"
    )
    seed: int = Field(0, description="seed of the noise draws (sd) and of the PCA's image/vector sampling")
    batch_size: int = Field(8, ge=1)
    cache: bool = True

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: int | None) -> int | None:
        if v is not None and v < 8:
            raise ValueError(f"input_size must be at least 8 (or null for the image size), got {v}")
        return v

    @model_validator(mode="after")
    def _check_layer(self) -> LayoutConfig:
        if self.backbone == "sd" and isinstance(self.layer, int):
            raise ValueError(
                f"layouts.layer: the sd backbone reads a UNet block by name (e.g. up_blocks.1), got {self.layer}"
            )
        if self.backbone != "sd" and isinstance(self.layer, str):
            raise ValueError(
                f"layouts.layer: the {self.backbone} backbone reads a hidden state by index (e.g. -1), got {self.layer!r}"
            )
        return self

    @property
    def channels(self) -> int:
        """Channels of a layout: N principal components, or K proxy-mask clusters (``kind: clustered``)."""
        return self.num_clusters if self.kind == "clustered" else self.num_components


class BaseModelConfig(_Section):
    """The frozen text-to-image base model: a diffusers folder/hub id, or the tiny preset trained here."""

    source: Literal["tiny", "pretrained"] = "tiny"
    pretrained: str | None = Field(
        None, description="hub id or diffusers folder, e.g. runwayml/stable-diffusion-v1-5"
    )
    local_files_only: bool = True
    resolution: int = Field(64, ge=16, description="training/generation image side of the tiny model")
    train_steps: int = Field(5000, ge=0, description="UNet + text-encoder steps (tiny model)")
    vae_steps: int = Field(1500, ge=0, description="VAE steps (tiny model)")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="UNet + text-encoder peak learning rate")
    vae_learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(250, ge=1)
    preset: Literal["tiny", "small", "small-f2"] = Field(
        "tiny",
        description="size of the tiny-architecture model trained here (small: wider VAE and UNet; "
        "small-f2: the small UNet over a 2x VAE, 32x32 latents for 64x64 images)",
    )
    vae_batch_size: int = Field(16, ge=1)
    vae_crop: int | None = Field(
        32, ge=8, description="random crop side for VAE training (None: full images)"
    )
    vae_edge_weight: float = Field(
        0.0, ge=0, description="weight of an image-gradient L1 term in the VAE loss"
    )
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "auto", description="UNet training autocast: auto = bf16 on CUDA, none on CPU"
    )

    @model_validator(mode="after")
    def _check(self) -> BaseModelConfig:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("base.source=pretrained needs base.pretrained (a hub id or a diffusers folder)")
        return self


class LumenTrainConfig(_Section):
    """LUMEN ControlNet training (or a comparison condition trained by the same trainer)."""

    condition: Literal["layout", "seg", "seg_sparse", "edges", "depth", "none"] = "layout"
    sparse_min_share: float = Field(0.3, ge=0, le=1)
    sparse_max_share: float = Field(0.9, ge=0, le=1)
    train_steps: int = Field(2000, ge=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    empty_prompt_prob: float = Field(0.1, ge=0, le=1)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    checkpoint_every: int = Field(500, ge=1)
    validate_every: int = Field(500, ge=1)
    supersample: int = Field(
        1, ge=1, le=4,
        description="the ControlNet trains and generates at this multiple of data.image_size: training images "
        "and the sources of variants are upsampled (bilinear) before their conditions are made, and the "
        "variants are downsampled (area) to data.image_size, the size of the labels they reuse. Small "
        "objects then span more latent cells. Needs a base trained at that size (base.resolution)",
    )  # fmt: skip


class DistillConfig(_Section):
    """Progressive distillation of the generator into few-step students (``lumen distill``, docs/synthesis.md)."""

    teacher_steps: int = Field(32, ge=1, description="the teacher's DDIM steps; a power of two")
    min_steps: int = Field(2, ge=1, description="the last round's steps; a power of two")
    guidance_min: float = Field(1.0, ge=1.0, description="lowest guidance weight the student learns")
    guidance_max: float = Field(5.0, ge=1.0, description="highest guidance weight the student learns")
    guidance_train_steps: int = Field(1000, ge=1, description="training steps of the guidance round")
    round_train_steps: int = Field(1000, ge=1, description="training steps of each halving round")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    checkpoint_every: int = Field(250, ge=1)

    @model_validator(mode="after")
    def _powers_of_two(self) -> DistillConfig:
        s, m = self.teacher_steps, self.min_steps
        if s & (s - 1) or m & (m - 1) or m > s:
            raise ValueError(f"teacher_steps ({s}) and min_steps ({m}) must be powers of two, min <= teacher")
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"guidance_min ({self.guidance_min}) must not exceed guidance_max")
        return self

    def student_steps(self) -> list[int]:
        """The step counts a student is distilled for: teacher_steps (guidance round), then each halving."""
        out, n = [], self.teacher_steps
        while n >= self.min_steps:
            out.append(n)
            n //= 2
        return out


class MapperConfig(_Section):
    """The semantic mapper (``lumen train-mapper``, docs/synthesis.md): a user input (a label map, a sketch
    or scribbles) -> the layout (or, for ``layouts.kind: clustered``, the proxy mask) of the run."""

    input: Literal["seg", "sketch", "scribble"] = Field(
        "seg", description="seg: one-hot label map; sketch: class boundaries; scribble: strokes per class"
    )
    shots: int | None = Field(
        None, ge=1, description="(label map, image) pairs it learns from (seeded choice); null = all"
    )
    train_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    width: int = Field(32, ge=8, description="hidden channels (multiple of 8)")
    depth: int = Field(6, ge=2, description="3x3 conv blocks (dilations 1, 2, 4 repeat)")
    downsample: int = Field(
        2, ge=1, description="the mapper works at 1/downsample of the map size (layouts are smooth)"
    )
    seed: int = 0

    @field_validator("width")
    @classmethod
    def _groups(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"mapper.width must be a multiple of 8 (GroupNorm of 8 groups), got {v}")
        return v


class ControlsConfig(_Section):
    """Class-specific appearance directions (``lumen train-controls``, docs/synthesis.md)."""

    classes: list[str] | None = Field(None, description="classes to find directions for; null = every class")
    directions_per_class: int = Field(5, ge=2, description="K directions per class")
    layer: str = Field("up_blocks.1", description="the UNet block whose output is edited")
    feature_layer: str = Field(
        "up_blocks.2", description="the later block whose features the triplet loss compares"
    )
    t_min: int = Field(500, ge=0, le=999, description="edits apply at timesteps t_min..t_max (early steps)")
    t_max: int = Field(999, ge=0, le=999)
    strength: float = Field(1.0, gt=0, description="training strength, in units of the block's feature norm")
    train_steps: int = Field(300, ge=1)
    batch_size: int = Field(4, ge=1, description="image pairs per step")
    learning_rate: float = Field(0.05, gt=0)
    triplet_weight: float = Field(1.0, ge=0)
    area_weight: float = Field(1.0, ge=0)
    margin: float = Field(0.5, ge=0)
    num_images: int = Field(256, ge=2, description="training images the directions are fitted on")
    min_pixels: int = Field(16, ge=1, description="a class counts in an image with at least this many pixels")
    seed: int = 0

    @model_validator(mode="after")
    def _range(self) -> ControlsConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"controls.t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self


class ClassEditConfig(_Section):
    """Class-specific appearance edits of the variants (``generate.class_edits``)."""

    classes: list[str] = Field(default_factory=list, description="classes edited; empty = no edits")
    directions: Literal["random"] | list[int] = Field("random", description="direction indices, or random")
    strengths: list[float] = Field(
        default_factory=lambda: [1.0], min_length=1, description="drawn per variant"
    )
    share: float = Field(1.0, ge=0, le=1, description="share of variants that get an edit")
    weights: Literal["uniform", "hardness"] = Field(
        "uniform",
        description="how the edited class is drawn among those present: uniformly, or in proportion to "
        "1 - IoU of a real-only segmenter on held-out training images (hardness-aware)",
    )
    file: str | None = Field(None, description="a directions.safetensors; null = the run's (train-controls)")


class GenerateConfig(_Section):
    """Variant generation from layouts (of real images, or of label maps through the mapper)."""

    model: str = Field(
        "lumen",
        description="lumen: the base model + LUMEN ControlNet; student: the run's distilled student for "
        "`steps` (`lumen distill`); or the folder of a saved student",
    )
    source: Literal["images", "labels"] = Field(
        "images",
        description="images: layouts of the real training images; labels: label maps without images "
        "(label_dir, or the dataset's seg maps), mapped to layouts by the mapper (`lumen train-mapper`)",
    )
    label_dir: Path | None = Field(
        None,
        description="source=labels: a folder of PNG label maps holding class ids; null = the dataset's seg",
    )
    mapper: str | None = Field(
        None, description="source=labels: a mapper folder; null = the run's mapper for mapper.input"
    )
    edits: list[Literal["hflip", "shift", "scale", "copy_paste"]] = Field(
        default_factory=list,
        description="source=labels: layout edits drawn for the edited copies of each map (docs/synthesis.md)",
    )
    edited_per_map: int = Field(0, ge=0, description="source=labels: edited copies made of each label map")
    keep_unedited: bool = Field(True, description="source=labels: also generate from each map as it is")
    edit_classes: list[str] | None = Field(
        None, description="classes whose objects edits move, scale or paste; null = any small component"
    )
    class_edits: ClassEditConfig = Field(
        default_factory=ClassEditConfig, description="class-specific appearance edits (lumen train-controls)"
    )
    variants: int = Field(4, ge=1)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    conditioning_scale: float = Field(
        1.0,
        ge=0,
        description="ControlNet residual scale (controlnet_conditioning_scale); chosen per dataset on train "
        "images with benchmarks/ceiling.py --split train (docs/models.md)",
    )
    strength: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the denoising schedule run: 1 = LUMEN, from pure noise; below 1 each variant "
        "starts from its source image's latent noised to that point (SDEdit), which keeps coarse geometry "
        "(small objects) at the cost of appearance diversity; source=images only (docs/models.md)",
    )
    layout_sharpen: float = Field(
        0.0,
        ge=0,
        description="unsharp-mask the conditions before the ControlNet: cond + layout_sharpen * (cond - box "
        "blur of radius layout_sharpen_radius px at the model size); steepens the boundaries between "
        "touching objects at some cost in judge mIoU (0: off; docs/models.md)",
    )
    layout_sharpen_radius: int = Field(4, ge=1, le=32, description="box-blur radius of layout_sharpen, in px")
    layout_sharpen_until: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the denoising steps (the first ones, where the coarse structure forms) that "
        "see the sharpened layout; the rest see the plain one (1: every step; docs/models.md)",
    )
    layout_supersample: int | None = Field(
        None,
        ge=2,
        le=4,
        description="the later denoising steps see layouts made from the sources upsampled this many times "
        "(the PCA as fitted) and resized (antialiased) to the generation size: finer boundaries, which keep "
        "touching objects apart on toy scenes at 3 (with the 2x pair); the first layout_supersample_after of "
        "the steps, where objects are placed, see the usual layouts. source=images only (null: off; "
        "docs/models.md)",
    )
    layout_supersample_after: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="share of the denoising steps (the first ones) that see the usual layouts before the "
        "layout_supersample ones (0: every step sees the finer layouts)",
    )
    supersample: int | None = Field(
        None,
        ge=1,
        le=4,
        description="generate at this multiple of data.image_size instead of lumen.supersample (the factor "
        "the ControlNet was trained at): the sources are upsampled, their conditions made and the variants "
        "generated on the larger grid, then downsampled (area) to the labels' size. The convolutional base "
        "and ControlNet run at any multiple of their downsampling; on toy scenes 3 keeps touching objects "
        "apart that the trained factor 2 merges, at some cost in appearance and 2.3x the generation time "
        "(null: lumen.supersample; docs/models.md)",
    )
    condition_guidance: bool = Field(
        False,
        description="classifier-free guidance on the layout as well as the prompt: the unconditional half "
        "runs without the ControlNet, so guidance_scale also amplifies the layout's pull (fewer lost "
        "objects on toy scenes, docs/models.md); false: the stock pipelines' guidance",
    )
    layout_guidance: float | None = Field(
        None,
        ge=0,
        description="with condition_guidance, the layout's own guidance weight: guidance_scale then weighs "
        "the prompt alone and a third UNet pass per step (the prompt without the ControlNet) sets the two "
        "apart (null: both use guidance_scale; docs/models.md)",
    )
    candidates: int = Field(
        1,
        ge=1,
        le=8,
        description="generate this many candidates per variant and keep the one whose own layout (read back "
        "from the generated image by the layout extractor) agrees best with its condition: label-free "
        "selection, K times the generation cost (1: off; layout ControlNets only; docs/models.md)",
    )
    candidate_score: Literal["edges", "cosine", "mse"] = Field(
        "edges",
        description="candidates > 1: how a candidate's layout is compared with its condition "
        "(pipeline.synthesis.metrics.layout_agreement; edges: where the boundaries are)",
    )
    scheduler: Literal["ddim", "dpm", "euler", "pndm"] = "ddim"
    prompt_template: str = "{caption}"
    variation_prompts: list[str] = Field(default_factory=list)
    batch_size: int = Field(16, ge=1)
    chunk_size: int = Field(32, ge=1, description="images per resumable unit of work")
    quality_filter: bool = Field(
        False, description="score variants with a segmenter trained on the real images (docs/synthesis.md)"
    )
    quality_mode: Literal["image", "objects", "pixel"] = Field(
        "image",
        description="image: drop variants whose seg agreement (pixel accuracy) is under quality_threshold; "
        "objects: that, and drop variants that lose an object (of quality_object_classes) that a binary "
        "object segmenter finds on the real source image; pixel: keep them but set pixels whose loss is far "
        "above their class's typical loss to ignore",
    )
    quality_threshold: float = Field(
        0.3, ge=0, le=1, description="image and objects modes: minimum agreement kept"
    )
    quality_retries: int = Field(
        0,
        ge=0,
        le=8,
        description="image and objects modes: a dropped variant is generated again with a new seed up to "
        "this many times; the first attempt that passes is kept (0: dropped at once)",
    )
    quality_object_classes: list[str] = Field(
        default_factory=list,
        description="objects mode: the classes that are objects (things); their connected regions are checked",
    )
    quality_min_pixels: int = Field(
        16, ge=1, description="objects mode: smallest object (connected region of an object class) checked"
    )
    quality_outlines: bool = Field(
        False,
        description="objects mode: also drop variants in which touching objects merge into one: a third "
        "segmenter, trained on the real images to draw outlines (where the seg class changes or the depth "
        "jumps by more than quality_depth_jump), finds the outlines inside the source's objects on the real "
        "source image, and at least half of them must be found on the variant (docs/synthesis.md)",
    )
    quality_depth_jump: float = Field(
        0.1,
        gt=0,
        description="quality_outlines: a relative depth step |d1 - d2| / min(d1, d2) between neighbouring "
        "pixels above this is an outline (datasets without depth: seg outlines only)",
    )
    quality_judge_steps: int | None = Field(
        None, ge=1, description="training steps of the filter's segmenters (null: perception.steps)"
    )
    quality_pixel_factor: float = Field(
        2.0,
        gt=0,
        description="pixel mode: ignore pixels whose loss exceeds factor x their class's median loss",
    )

    @model_validator(mode="after")
    def _quality_retries(self) -> GenerateConfig:
        if self.quality_retries and not self.quality_filter:
            raise ValueError("generate.quality_retries regenerates variants the quality filter drops: "
                             "it needs generate.quality_filter=true")  # fmt: skip
        if self.quality_retries and self.quality_mode == "pixel":
            raise ValueError("generate.quality_retries needs quality_mode image or objects (pixel mode "
                             "drops no variant)")  # fmt: skip
        if self.quality_filter and self.quality_mode == "objects" and not self.quality_object_classes:
            raise ValueError("generate.quality_mode=objects needs generate.quality_object_classes: the "
                             "classes that are objects")  # fmt: skip
        if self.quality_outlines and not (self.quality_filter and self.quality_mode == "objects"):
            raise ValueError("generate.quality_outlines checks touching objects in objects mode: it needs "
                             "generate.quality_filter=true and generate.quality_mode=objects")  # fmt: skip
        if self.quality_filter and self.quality_mode == "objects" and self.source != "images":
            raise ValueError("generate.quality_mode=objects compares each variant with its real source image: "
                             "it needs generate.source=images")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _label_source(self) -> GenerateConfig:
        if self.strength < 1 and self.source != "images":
            raise ValueError(
                "generate.strength < 1 starts from the source images: it needs generate.source=images"
            )
        if self.strength < 1 and self.scheduler == "pndm":
            raise ValueError("generate.strength < 1 needs the ddim, dpm or euler scheduler, not pndm")
        if self.candidates > 1 and (self.source != "images" or self.edited_per_map):
            raise ValueError("generate.candidates compares the layout read back from each candidate with the "
                             "one its source image gave: it needs generate.source=images and no "
                             "edited_per_map")  # fmt: skip
        if self.layout_supersample is not None:
            if self.layout_sharpen:
                raise ValueError("generate.layout_supersample and layout_sharpen both change the layout some steps "
                                 "see: use one")  # fmt: skip
            if self.source != "images" or self.edited_per_map:
                raise ValueError("generate.layout_supersample makes layouts from upsampled source images: it "
                                 "needs generate.source=images and no edited_per_map")  # fmt: skip
        if self.layout_guidance is not None and not self.condition_guidance:
            raise ValueError("generate.layout_guidance weighs the layout apart from the prompt: it needs "
                             "generate.condition_guidance=true")  # fmt: skip
        if self.edited_per_map and not self.edits:
            raise ValueError("generate.edited_per_map > 0 needs generate.edits, e.g. [hflip, shift, scale]")
        if self.source == "labels" and not self.keep_unedited and not self.edited_per_map:
            raise ValueError(
                "generate.source=labels with keep_unedited=false needs generate.edited_per_map > 0: "
                "else there is nothing to generate from"
            )
        return self


class ShardConfig(_Section):
    """WebDataset shard writing (see docs/shards.md for the schema)."""

    max_samples: int = Field(256, ge=1, description="samples per shard at most")
    max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="tar bytes per shard, approximately at most"
    )
    image_format: Literal["png", "jpg", "webp"] = "png"
    image_quality: int = Field(95, ge=1, le=100, description="jpg/webp quality; webp at 100 is lossless")
    png_compress_level: int = Field(3, ge=0, le=9, description="zlib level of PNGs: 3 is ~2x faster than 6")
    depth_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16 halves depth.npy, lossy"
    )
    normal_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16 halves normal.npy, lossy"
    )
    store_layout: bool = False


Task = Literal["seg", "depth", "normal"]
TASKS: tuple[Task, ...] = ("seg", "depth", "normal")
"""Every perception task, in the order tasks are listed."""
Arm = Literal["real", "real+augment", "real+oracle", "real+synthetic"]
_DEFAULT_ARMS: tuple[Arm, ...] = ("real", "real+augment", "real+synthetic")


class PerceptionConfig(_Section):
    """Downstream perception models trained on real vs real+synthetic (see docs/perception.md).

    The defaults are CPU-sized for the embedded demo: a ~1.6M-parameter U-Net (``tu-resnet10t`` encoder
    of depth 4, narrow decoder), 300 steps of batch 8. On a GPU use e.g. ``encoder: resnet50``,
    ``encoder_depth: 5``, ``decoder_channels: null`` (smp's default widths), ``steps: 20000``.
    """

    tasks: list[Task] | None = Field(
        None,
        description="models trained: seg, depth, normal; null = every label the dataset has (resolved at "
        "the start of a run, see pipeline/preflight.py)",
    )
    class_iou: bool = Field(
        False,
        description="also report each class's IoU (seg metric iou_<class name>), so the gains report "
        "gives a gain and CI per class; off by default to keep reports short",
    )
    multitask: bool = Field(False, description="one shared model for all tasks instead of one per task")
    arch: str = Field("Unet", description="smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...")
    encoder: str = Field(
        "tu-resnet10t", description="smp encoder name, e.g. resnet18, resnet50, tu-resnet10t"
    )
    encoder_weights: str | None = Field(
        None, description="null = random init; 'imagenet' needs the weights already in the local cache"
    )
    encoder_depth: int = Field(4, ge=3, le=5, description="encoder stages used; inputs are padded to 2^depth")
    decoder_channels: list[int] | None = Field(
        default_factory=lambda: [64, 32, 16, 16],
        description="Unet/UnetPlusPlus decoder widths, one per encoder stage; null = smp's default widths "
        "(the first encoder_depth of 256, 128, 64, 32, 16)",
    )
    steps: int = Field(300, ge=1, description="optimizer steps per run, the same in every arm")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(
        1, ge=1,
        description="batches accumulated per optimizer step: a step sees grad_accum x (batch_size + extra) "
        "samples; steps and val_every count optimizer steps",
    )  # fmt: skip
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Lightning precision: 32, bf16-mixed (CPU or GPU autocast), 16-mixed (CUDA)"
    )
    val_batch_size: int | None = Field(None, ge=1, description="null = batch_size")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW peak learning rate (cosine decay)")
    weight_decay: float = Field(1e-4, ge=0)
    depth_loss: Literal["silog", "l1"] = "silog"
    silog_lambda: float = Field(0.85, ge=0, le=1, description="scale-invariance weight of the silog loss")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    arms: list[Arm] = Field(
        default_factory=lambda: list(_DEFAULT_ARMS),
        description="arms trained per seed: real; real+augment (strong photometric augmentation of the real "
        "images as the extra samples); real+oracle (toy scenes: the same scenes re-rendered with new "
        "appearance, exact labels, the ceiling); real+synthetic (the generator's variants)",
    )
    mixing: Literal["additive", "replace"] = Field(
        "additive",
        description="additive: every batch = batch_size real samples (exactly those of the real arm) + "
        "round(batch_size * extra_ratio) extra ones on top; replace: synthetic_ratio of each batch is extra",
    )
    extra_ratio: float = Field(1.0, gt=0, le=8, description="additive mixing: extra samples per real one")
    synthetic_ratio: float = Field(
        0.5, ge=0, le=1, description="replace mixing: share of synthetic samples in each batch"
    )
    augment_strength: float = Field(
        1.0,
        gt=0,
        le=3,
        description="real+augment: strength of the photometric augmentation (colour, blur, noise)",
    )
    oracle_variants: int = Field(2, ge=1, description="real+oracle: re-renders per labelled toy scene")
    oracle_domains: list[str] | None = Field(
        None, description="real+oracle: appearance domains of the re-renders; null = data.domains"
    )
    full_setting: bool = Field(True, description="also run the full-label setting beside low-label")
    report_split: Literal["test", "val"] | None = Field(
        None,
        description="split the metrics are reported on: test (toy scenes: a third, disjoint stream) or val "
        "(datasets without a test split, e.g. CamVid); schedules are chosen on val only; null = test for "
        "toy scenes, val for the other adapters",
    )
    num_test_images: int = Field(256, ge=1, description="toy scenes: test scenes")
    test_domains: list[str] | None = Field(
        None,
        description="toy scenes: domains of the val and test scenes; null = data.domains (cross-domain: "
        "train on data.domains, test on these)",
    )
    val_every: int | None = Field(
        None,
        ge=1,
        description="log the validation metrics every N steps (the learning curve); null = at the end",
    )
    low_label_fraction: float | None = Field(
        0.1, gt=0, le=1, description="labelled real share of the low-label setting; null = full setting only"
    )
    crop_size: tuple[int, int] | None = Field(
        None, description="(height, width) of training crops; null = image size"
    )
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="area range of the random resized crop")
    hflip: bool = Field(True, description="random horizontal flips (normals' x is negated)")
    color_jitter: float = Field(0.2, ge=0, le=1, description="brightness/contrast/saturation jitter; 0 = off")
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the paired test over seeds")

    @field_validator("crop_size", mode="before")
    @classmethod
    def _square_crop(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _check(self) -> PerceptionConfig:
        if self.crop_size is not None and min(self.crop_size) < 8:
            raise ValueError(f"crop_size must be at least 8x8, got {self.crop_size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.decoder_channels is not None and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} widths but encoder_depth is "
                f"{self.encoder_depth}: give one width per stage, or null for smp's default"
            )
        if self.tasks is not None and not self.tasks:
            raise ValueError(
                "perception.tasks is empty; choose from seg, depth, normal, or null for every label"
            )
        return self


class RunnerConfig(_Section):
    """How Prefect runs tasks, and how many processes train (data-parallel, docs/scaling.md)."""

    kind: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None
    gpu_concurrency: int = Field(1, ge=1)
    devices: int = Field(
        1, ge=1,
        description="training processes per node (GPUs, or CPU processes); the base model, ControlNet "
        "and perception then train data-parallel and their batch sizes are global batches",
    )  # fmt: skip
    num_nodes: int = Field(1, ge=1, description="nodes of a multi-node job (started by torchrun or SLURM)")
    strategy: Literal["auto", "ddp", "ddp_spawn"] = Field(
        "auto",
        description="auto: ddp under a launcher (torchrun, SLURM), else ddp_spawn (the pipeline spawns "
        "runner.devices processes itself)",
    )


class GainsConfig(_Section):
    """The gains study of ``lumen gains``: named settings, each this config plus overrides, run in
    ``<out>/<setting>`` (expand, then the perception arms) and reported together (docs/perception.md)."""

    settings: dict[str, list[str]] = Field(
        default_factory=dict,
        description="setting name -> key=value overrides of this config, e.g. cross-domain: "
        "[data.domains=[day, studio], perception.test_domains=[night]]; empty = this config as one setting",
    )


class LumenConfig(_Section):
    """One run of the pipeline, every stage included."""

    name: str = "run"
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    runs_dir: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    layouts: LayoutConfig = Field(default_factory=LayoutConfig)
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    lumen: LumenTrainConfig = Field(default_factory=LumenTrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mapper: MapperConfig = Field(default_factory=MapperConfig)
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    perception: PerceptionConfig = Field(default_factory=PerceptionConfig)
    gains: GainsConfig = Field(default_factory=GainsConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\. "):
            raise ValueError(f"name must be non-empty without '/', '\\\\', '.' or spaces, got {v!r}")
        return v

    @model_validator(mode="after")
    def _layout_supersample(self) -> LumenConfig:
        k, g = self.generate.supersample or self.lumen.supersample, self.generate.layout_supersample
        if g is not None and g == k:
            raise ValueError(
                f"generate.layout_supersample={g} is the factor the variants are generated at already "
                f"(generate.supersample or lumen.supersample): set generate.layout_supersample=null or above {k}"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loading, overrides, hashing
# --------------------------------------------------------------------------------------------------


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _check_keys(raw: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys before pydantic does, so the message lists the valid keys at that level."""
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in model.model_fields:
            valid = ", ".join(_valid_keys(model))
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"unknown config key '{where}'. Valid keys under {section}: {valid}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, Mapping):
            _check_keys(value, annotation, prefix=f"{where}.")


class _AliasError(ConfigError):
    """A YAML alias in a config or override."""


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a config never needs them, and nested
    aliases expand exponentially (the "billion laughs" bomb) before any key could be checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(
                f"YAML aliases (*{event.anchor}, line {event.start_mark.line + 1}) are not allowed "
                "in configs; write the values out"
            )
        return super().compose_node(parent, index)


def safe_load_yaml(text: str | IO[str]) -> Any:
    """Parse untrusted YAML: safe tags only, no aliases (raises :class:`ConfigError`)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: safe tags only
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}".replace("\n", " ")) from None


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, booleans, null, lists), falling back to the raw string."""
    try:
        return safe_load_yaml(text)
    except _AliasError:
        raise
    except ConfigError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it.

    Values are parsed as YAML, so ``data.num_images=64``, ``generate.variation_prompts=[a, b]`` and
    ``data.root=null`` do what they look like.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def build_config(raw: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> LumenConfig:
    """Validate a raw dict (plus overrides) into a :class:`LumenConfig`."""
    _check_keys(raw or {}, LumenConfig)  # before the copy: never expand what will be refused
    data = json.loads(json.dumps(dict(raw or {}), default=str))  # deep copy, plain types
    apply_overrides(data, overrides)
    _check_keys(data, LumenConfig)
    try:
        return LumenConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> LumenConfig:
    """Load a YAML config (``yaml.safe_load``), apply overrides and validate.

    Relative ``data.root`` paths are resolved against the current directory, as a user typing a path
    on the command line expects; the resolved config records the absolute path.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}. Pass a YAML file such as configs/demo.yaml")
        try:
            with p.open(encoding="utf-8") as f:
                loaded = safe_load_yaml(f)
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config {p}: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: the top level of a config must be a mapping, got {type(loaded).__name__}"
            )
        raw = loaded
    cfg = build_config(raw, overrides)
    if cfg.data.root is not None and not cfg.data.root.is_absolute():
        cfg.data.root = cfg.data.root.resolve()
    return cfg


def gains_setting_configs(
    path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()
) -> dict[str, LumenConfig]:
    """The configs of the settings of ``lumen gains``: for each ``gains.settings`` entry, the config
    plus its overrides (and without ``gains.settings``); a config without settings is one setting,
    ``main``."""
    cfg = load_config(path, overrides)
    settings = dict(cfg.gains.settings) or {"main": []}
    return {
        name: load_config(path, [*overrides, *extra, "gains.settings={}"]) for name, extra in settings.items()
    }


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-compatible dict of a config (paths as strings, tuples as lists)."""
    return json.loads(cfg.model_dump_json())


def config_hash(cfg: BaseModel, length: int = 16) -> str:
    """Stable content hash: sha256 of the canonical JSON of the config (sorted keys).

    The ``runner`` section of a :class:`LumenConfig` is left out: how tasks are scheduled (threads or
    Dask, how many workers) does not change what a run produces, so a run may resume on another runner.
    """
    data = config_dict(cfg)
    if isinstance(cfg, LumenConfig):
        data.pop("runner", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def save_config(cfg: LumenConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML (with its hash in a header comment), atomically."""
    body = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    atomic_write_text(path, f"# resolved config, hash {config_hash(cfg)}\n{body}")
    return Path(path)
