"""The semantic mapper: from what a user has (a label map, a sketch, scribbles) to a neural layout or a
proxy mask (after Chae et al., "Semantic Image Synthesis with Unconditional Generator", NeurIPS 2023).

The mapper's inputs are synthesised from seg label maps, so training needs only (label map, image)
pairs whose layouts come from the images themselves:

- ``seg``: the one-hot label map;
- ``sketch``: the label map's class boundaries (1 channel), as a user's line drawing;
- ``scribble``: a few random strokes inside each class region, one-hot by class, zero elsewhere.

:class:`SemanticMapper` is a small fully convolutional network at the input's resolution, trained by
:func:`fit_mapper` to regress the PCA layout (``target="layout"``, MSE) or to classify each pixel's
proxy-mask cluster (``target="proxy"``, cross-entropy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from pipeline.conditions import seg_onehot
from pipeline.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "MAPPER_CARD",
    "MAPPER_INPUTS",
    "SemanticMapper",
    "fit_mapper",
    "label_sketch",
    "load_mapper",
    "mapper_input",
    "outputs_to_condition",
    "predict",
    "save_mapper",
    "scribbles",
]

MAPPER_INPUTS = ("seg", "sketch", "scribble")
MAPPER_CARD = "mapper.json"
MAPPER_WEIGHTS = "mapper.safetensors"


def label_sketch(seg: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (1, H, W) float32 class boundaries: 1 where a 4-neighbour has another class."""
    s = seg.astype(np.int64)
    edge = np.zeros(s.shape, bool)
    edge[:, 1:] |= s[:, 1:] != s[:, :-1]
    edge[:, :-1] |= s[:, 1:] != s[:, :-1]
    edge[1:, :] |= s[1:, :] != s[:-1, :]
    edge[:-1, :] |= s[1:, :] != s[:-1, :]
    return edge[None].astype(np.float32)


def scribbles(
    seg: np.ndarray, num_classes: int, rng: np.random.Generator, strokes: int = 2, length: int = 12
) -> np.ndarray:
    """(H, W) class ids -> (num_classes, H, W) float32 scribbles: per class present, ``strokes`` random
    walks of up to ``length`` pixels that start inside the class and stop where they would leave it."""
    h, w = seg.shape
    out = np.zeros((num_classes, h, w), np.float32)
    moves = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])
    for c in np.unique(seg):
        if not 0 <= c < num_classes:
            continue
        ys, xs = np.nonzero(seg == c)
        for _ in range(strokes):
            i = int(rng.integers(len(ys)))
            y, x = int(ys[i]), int(xs[i])
            direction = moves[rng.integers(4)]
            for _ in range(length):
                out[c, y, x] = 1.0
                if rng.random() < 0.3:  # turn now and then
                    direction = moves[rng.integers(4)]
                ny, nx = y + int(direction[0]), x + int(direction[1])
                if not (0 <= ny < h and 0 <= nx < w) or seg[ny, nx] != c:
                    break
                y, x = ny, nx
    return out


def mapper_input(
    kind: str, seg: np.ndarray, num_classes: int, rng: np.random.Generator, ignore_index: int | None = None
) -> np.ndarray:
    """The mapper input ``kind`` (``seg`` / ``sketch`` / ``scribble``) of one label map, (C_in, H, W)."""
    if kind == "seg":
        return seg_onehot(seg, num_classes, ignore_index)
    if kind == "sketch":
        return label_sketch(seg)
    if kind == "scribble":
        return scribbles(seg, num_classes, rng)
    raise ValueError(f"unknown mapper input {kind!r}; valid: {', '.join(MAPPER_INPUTS)}")


class SemanticMapper(nn.Module):
    """A small fully convolutional network from a user input to a layout or proxy-mask logits.

    Args:
        in_channels: the input's channels (num_classes for ``seg``/``scribble``, 1 for ``sketch``).
        out_channels: the layout's N components, or the K proxy-mask clusters.
        width: hidden channels.
        depth: 3x3 conv blocks (each GroupNorm + SiLU); dilations grow to widen the receptive field.
        downsample: the input is average-pooled by this factor and the output upsampled back
            (bilinear): layouts are smooth (backbone features at 1/4 of the image or coarser), so a
            coarser mapper loses little and trains factor^2 times faster.
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int = 64, depth: int = 4, downsample: int = 1
    ) -> None:
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.depth, self.downsample = depth, downsample
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
        for i in range(depth - 1):
            d = 2 ** (i % 3)
            layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.GroupNorm(8, width), nn.SiLU()]
        layers.append(nn.Conv2d(width, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if self.downsample > 1:
            x = nn.functional.avg_pool2d(x, self.downsample, ceil_mode=True)
        out: torch.Tensor = self.net(x)
        if out.shape[-2:] != size:
            out = nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def fit_mapper(
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    target: Literal["layout", "proxy"],
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 8,
    width: int = 64,
    seed: int = 0,
    depth: int = 4,
    out_classes: int | None = None,
    downsample: int = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[SemanticMapper, list[float]]:
    """Train a mapper on (inputs (B, C_in, H, W), targets) pairs; returns it (eval mode) and the losses.

    ``target="layout"``: targets are (B, N, H, W) layouts, MSE. ``target="proxy"``: (B, H, W) int cluster
    ids in [0, K), or (B, K, H, W) proxy masks (argmax is taken), cross-entropy; ``out_classes`` = K
    (default: the largest id seen + 1, or the masks' K). ``on_step(step, loss)`` is called after each step
    (e.g. a progress bar).
    """
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets))
    if target == "proxy":
        if y.ndim == 4 and out_classes is None:
            out_classes = int(y.shape[1])
        y = (y.argmax(1) if y.ndim == 4 else y).long()
        out_channels = out_classes if out_classes is not None else (int(y.max()) + 1 if y.numel() else 1)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    elif target == "layout":
        y = y.float()
        out_channels = y.shape[1]
        loss_fn = nn.MSELoss()
    else:
        raise ValueError(f"target must be 'layout' or 'proxy', got {target!r}")
    if x.ndim != 4 or len(x) != len(y) or x.shape[-2:] != y.shape[-2:]:
        raise ValueError(f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} do not pair up")
    model = SemanticMapper(x.shape[1], out_channels, width=width, depth=depth, downsample=downsample)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return model.eval(), losses


def predict(model: SemanticMapper, inputs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Mapper outputs (B, C_out, H, W) float32 for a batch of inputs."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(inputs), dtype=torch.float32)).numpy()


def outputs_to_condition(outputs: np.ndarray, target: str, temperature: float | None = None) -> np.ndarray:
    """Mapper outputs (B, C, H, W) -> the ControlNet condition: a layout clipped to [0, 1], or for a
    proxy-mask mapper the one-hot argmax (or, with ``temperature``, the softmax of logits / T)."""
    x = np.asarray(outputs, dtype=np.float32)
    if target == "layout":
        return np.clip(x, 0.0, 1.0)
    if target != "proxy":
        raise ValueError(f"target must be 'layout' or 'proxy', got {target!r}")
    if temperature is not None:
        z = x / temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    return np.eye(x.shape[1], dtype=np.float32)[x.argmax(axis=1)].transpose(0, 3, 1, 2).copy()


def save_mapper(model: SemanticMapper, folder: str | os.PathLike[str], card: Mapping[str, Any]) -> Path:
    """Write ``mapper.safetensors`` and ``mapper.json`` (the card: input, target, channels, width, depth,
    and what it was trained on) atomically; the card is written last, so it marks a complete mapper."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    first = next(m for m in model.net if isinstance(m, nn.Conv2d))
    arch = {"in_channels": first.in_channels, "out_channels": model.net[-1].out_channels,
            "width": first.out_channels, "depth": model.depth, "downsample": model.downsample}  # fmt: skip
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / MAPPER_WEIGHTS, st_save(weights))
    atomic_write_json(out / MAPPER_CARD, {**dict(card), **arch})
    return out


def load_mapper(folder: str | os.PathLike[str]) -> tuple[SemanticMapper, dict[str, Any]]:
    """A mapper saved by :func:`save_mapper` (eval mode) and its card."""
    folder = Path(folder)
    if not (folder / MAPPER_CARD).is_file():
        raise FileNotFoundError(
            f"no semantic mapper in {folder} (no {MAPPER_CARD}); run `lumen train-mapper` first"
        )
    card: dict[str, Any] = json.loads((folder / MAPPER_CARD).read_text())
    model = SemanticMapper(
        card["in_channels"], card["out_channels"], width=card["width"], depth=card["depth"],
        downsample=int(card.get("downsample", 1)),
    )  # fmt: skip
    model.load_state_dict(load_file(str(folder / MAPPER_WEIGHTS)))
    return model.eval(), card
