"""Stage functions end to end on tiny data: files written where the run folder layout says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import ControlNetModel

from pipeline.config import build_config
from pipeline.data import Quarantine
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.stages import collect_samples, run_train_lumen
from pipeline.lumen.tokenizer import build_tokenizer
from tests.test_lumen import PRESET, RES


def _cfg(condition: str):
    return build_config(
        {
            "data": {"num_images": 4, "num_val_images": 2, "image_size": [RES, RES]},
            "base": {"resolution": RES},
            "layouts": {"num_components": 4, "pca_images": 4, "pca_vectors_per_image": 32, "batch_size": 2},
            "lumen": {
                "condition": condition,
                "train_steps": 2,
                "batch_size": 2,
                "checkpoint_every": 1,
                "validate_every": 100,
            },
        }
    )


@pytest.mark.parametrize("condition,channels", [("layout", 4), ("seg_sparse", 6)])
def test_train_lumen_writes_a_loadable_controlnet(tmp_path: Path, condition: str, channels: int) -> None:
    cfg = _cfg(condition)
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    assert len(data) == 4 and data.load(data.keys()[0]).image.shape == (RES, RES, 3)
    tok = build_tokenizer([s.caption for s in data], max_length=16)
    build_tiny_components(tok, RES, preset=PRESET).save(tmp_path / "base")

    out = run_train_lumen(cfg, tmp_path, progress=False)
    cn = ControlNetModel.from_pretrained(out)
    assert cn.config.conditioning_channels == channels
    card = json.loads((out / "lumen.json").read_text())
    assert card["condition"] == condition and card["channels"] == channels and card["trained_steps"] == 2
    assert (out / "README.md").is_file()
    assert (tmp_path / "lumen_train" / "validation" / "step-000002.png").is_file()
    assert (tmp_path / "lumen_train" / "checkpoints" / "step-000002" / "controlnet.safetensors").is_file()
    if condition == "layout":
        assert (tmp_path / "pca.safetensors").is_file()
        assert card["layout"]["num_components"] == 4 and len(card["pca_sha256"]) == 64
        cached = list((tmp_path / "layouts").glob("*/*.npy"))
        assert len(cached) == 4 and np.load(cached[0]).dtype == np.float16
