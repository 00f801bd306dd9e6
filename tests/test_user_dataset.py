"""A new user's own folder dataset: label mappings, the hash-based val split, the data-check advice,
the preflight that fails in seconds, bounded progress logs, and ``lumen run`` end to end on greyscale
images with 0/255 masks and no validation folder."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lumen_cli.main import main
from pipeline.config import ConfigError, build_config, config_hash, load_config, save_config
from pipeline.data import Quarantine, build_dataset, iter_valid
from pipeline.data.labels import MaskStats, advise
from pipeline.preflight import preflight, resolve_config

CLASSES = ["background", "foreground"]
RES = 16  # the tiny test models of tests/test_lumen.py


def write_user_dataset(root: Path, n: int = 12, size: int = 48, seed: int = 0) -> Path:
    """Greyscale images with a bright square on noise; masks store the square as 255 (no val folder)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "seg").mkdir(exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 90, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        img[top : top + size // 3, left : left + size // 3] = 220
        mask[top : top + size // 3, left : left + size // 3] = 255
        Image.fromarray(img, "L").save(root / "images" / f"scan_{seed}_{i:03d}.png")
        Image.fromarray(mask, "L").save(root / "seg" / f"scan_{seed}_{i:03d}.png")
    return root


def folder_cfg(root: Path, **data: object):
    return build_config({"data": {"adapter": "folder", "root": str(root), "classes": CLASSES, **data}})


# --------------------------------------------------------------------------------------------------
# Label mappings
# --------------------------------------------------------------------------------------------------


def test_binary_masks_map_by_value_with_names_or_ids(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=3)
    for label_map in ({0: "background", 255: "foreground"}, {0: 0, 255: 1}):
        ds = build_dataset(folder_cfg(root, label_map=label_map).data)
        q = Quarantine(None)
        samples = list(iter_valid(ds, q))
        assert len(q) == 0 and samples
        assert {int(v) for s in samples for v in np.unique(s.seg)} == {0, 1}
        assert samples[0].image.shape[2] == 3  # greyscale images become RGB


def _colour_mask(path: Path, colours: list[tuple[int, int, int]]) -> None:
    mask = np.zeros((16, 16, 3), np.uint8)
    for i, rgb in enumerate(colours):
        mask[:, i * 4 : (i + 1) * 4] = rgb
    Image.fromarray(mask, "RGB").save(path)


def test_colour_masks_map_by_rgb_and_unmapped_colours_are_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "seg").mkdir()
    for stem, colours in (("a", [(128, 64, 128), (70, 130, 180), (0, 0, 0)]), ("b", [(255, 0, 255)])):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        _colour_mask(root / "seg" / f"{stem}.png", colours)
    cfg = build_config({"data": {
        "adapter": "folder", "root": str(root), "classes": ["road", "sky"], "val_fraction": None, "image_size": None,
        "label_map": {"#804080": "road", "70,130,180": "sky"}, "ignore_values": ["[0, 0, 0]"],
        "ignore_index": 255,
    }})  # fmt: skip
    q = Quarantine(None)
    samples = list(iter_valid(build_dataset(cfg.data), q))
    assert [s.key for s in samples] == ["folder-a"]
    seg = samples[0].seg
    assert seg[0, :4].tolist() == [0] * 4 and seg[0, 4:8].tolist() == [1] * 4
    assert (seg[:, 8:] == 255).all()  # black and the unpainted rest: ignore
    (record,) = q.records
    assert record["reason"] == "seg_unmapped_value" and "#ff00ff" in record["detail"]
    assert "data.label_map" in record["detail"]


def test_sixteen_bit_id_masks_map_ids_and_ignore_values(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "seg").mkdir()
    ids = np.array([[0, 7, 8, 26]] * 4, np.uint16).repeat(4, axis=1)
    Image.fromarray(np.zeros((4, 16, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(ids).save(root / "seg" / "x.png")
    cfg = build_config({"data": {
        "adapter": "folder", "root": str(root), "classes": ["road", "sidewalk", "car"], "val_fraction": None,
        "image_size": None,
        "label_map": {7: "road", 8: "sidewalk", 26: "car"}, "ignore_values": [0], "ignore_index": 255,
    }})  # fmt: skip
    seg = build_dataset(cfg.data).load("folder-x").seg
    assert seg.dtype == np.uint8 and seg[0].tolist() == [255] * 4 + [0] * 4 + [1] * 4 + [2] * 4
    # ignore values alone: the other values pass through as class ids
    only = cfg.model_copy(deep=True)
    only.data.label_map = None
    only.data.ignore_values = [26]
    assert only.data.labels() is not None and only.data.labels().apply(np.array([[0, 1, 26]]))[
        0
    ].tolist() == [0, 1, 255]


@pytest.mark.parametrize(
    "data,key",
    [
        ({"label_map": {0: "background", 255: "fg"}}, r"data\.label_map\[255\]: 'fg' is not a class"),
        ({"label_map": {0: 0, 255: 2}}, r"data\.label_map\[255\]: class id 2 is outside"),
        ({"label_map": {0: "background", "#ffffff": "foreground"}}, r"mix label values and colours"),
        ({"ignore_values": [255]}, r"data\.ignore_values needs data\.ignore_index"),
        ({"label_map": {"#12345": "background"}}, r"data\.label_map key '#12345'"),
        ({"adapter": "camvid", "label_map": {0: "background"}}, r"read by the folder adapter"),
    ],
)
def test_bad_label_mappings_fail_at_config_load_naming_the_key(tmp_path: Path, data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config({"data": {"adapter": "folder", "root": str(tmp_path), "classes": CLASSES, **data}})


def test_a_saved_label_map_reloads_to_the_same_config_and_hash(tmp_path: Path) -> None:
    cfg = folder_cfg(tmp_path, label_map={0: "background", "255": "foreground"})
    assert cfg.data.label_map == {0: "background", 255: "foreground"}
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.data.label_map == cfg.data.label_map and config_hash(again) == config_hash(cfg)


# --------------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------------


def test_val_split_is_a_deterministic_disjoint_hash_share_stable_when_files_are_added(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=40, size=16)
    cfg = folder_cfg(root, label_map={0: "background", 255: "foreground"}, val_fraction=0.2,
                     num_images=None, num_val_images=None)  # fmt: skip
    train, val = (build_dataset(cfg.data, s).keys() for s in ("train", "val"))
    assert not set(train) & set(val) and len(train) + len(val) == 40
    assert 2 <= len(val) <= 16  # about 20% of 40
    assert build_dataset(cfg.data, "val").keys() == val  # deterministic
    assert "data.val_fraction=0.2" in (build_dataset(cfg.data, "val").split_description or "")
    write_user_dataset(root, n=25, size=16, seed=1)  # more files: nobody changes sides
    train2, val2 = (set(build_dataset(cfg.data, s).keys()) for s in ("train", "val"))
    assert set(val) <= val2 and set(train) <= train2 and not train2 & val2 and len(train2 | val2) == 65


def test_a_tiny_folder_still_gets_one_val_image_and_no_fraction_means_no_split(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=3, size=16)
    cfg = folder_cfg(root, val_fraction=0.01)
    assert len(build_dataset(cfg.data, "val")) == 1 and len(build_dataset(cfg.data, "train")) == 2
    with pytest.raises(ConfigError, match=r"data\.val_image_dir.*data\.val_fraction"):
        build_dataset(folder_cfg(root, val_fraction=None).data, "val")


# --------------------------------------------------------------------------------------------------
# Data-check advice
# --------------------------------------------------------------------------------------------------


def test_data_check_suggests_the_label_map_of_binary_masks(tmp_path: Path, capsys) -> None:
    root = write_user_dataset(tmp_path / "ds", n=6, size=16)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        yaml.safe_dump({"data": {"adapter": "folder", "root": str(root), "classes": CLASSES}})
    )
    assert main(["data", "check", str(cfg_path)]) == 1
    out = capsys.readouterr().out
    assert "only the values 0 and 255" in out and "label_map: {0: background, 255: foreground}" in out
    assert "'data.label_map={0: background, 255: foreground}'" in out
    assert '"split": "train = all but 10%' in out
    fixed = [str(cfg_path), "data.label_map={0: background, 255: foreground}"]
    for split in ("train", "val"):
        assert main(["data", "check", *fixed, "--split", split]) == 0


def test_advice_for_colour_masks_names_known_colours_and_ignores_black() -> None:
    stats = MaskStats()
    stats.colours.update({(128, 64, 128): 50, (70, 130, 180): 30, (0, 0, 0): 5, (1, 2, 3): 1})
    stats.files = 2
    advice = advise(stats, ["road", "sky"], None)
    assert advice is not None and "colour-coded" in advice.problem
    assert advice.settings["label_map"] == '{"#804080": road, "#4682b4": sky, "#010203": class_3}'
    assert advice.settings["ignore_values"] == '["#000000"]' and advice.settings["ignore_index"] == "255"
    lines = yaml.safe_load(advice.yaml())["data"]  # the printed lines are valid YAML
    assert lines["label_map"]["#804080"] == "road"


def test_advice_for_ids_above_the_class_count() -> None:
    stats = MaskStats()
    stats.values.update({0: 10, 1: 10, 255: 3})
    advice = advise(stats, ["a", "b"], None)
    assert advice is not None and advice.settings == {"ignore_index": "255"}
    stats = MaskStats()
    stats.values.update({0: 1, 1: 1, 2: 1, 5: 1})
    advice = advise(stats, ["a", "b", "c"], None)
    assert advice is not None and advice.settings["label_map"] == "{0: a, 1: b, 2: c, 5: class_5}"
    assert "ids 0, 1, 2, 5" in advice.problem
    stats = MaskStats()
    stats.values.update({0: 1, 1: 1})
    assert advise(stats, ["a", "b"], None) is None  # nothing wrong


# --------------------------------------------------------------------------------------------------
# Preflight: defaults that follow the data, and failing fast
# --------------------------------------------------------------------------------------------------


def test_tasks_and_report_split_default_to_the_dataset(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=3, size=16)
    cfg = resolve_config(folder_cfg(root, label_map={0: "background", 255: "foreground"}))
    assert cfg.perception.tasks == ["seg"] and cfg.perception.report_split == "val"
    toy = resolve_config(build_config({}))
    assert toy.perception.tasks == ["seg", "depth", "normal"] and toy.perception.report_split == "test"
    explicit = resolve_config(build_config({"perception": {"tasks": ["depth"]}}))
    assert explicit.perception.tasks == ["depth"]


def test_preflight_explains_0_255_masks_without_a_label_map(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=4, size=16)
    with pytest.raises(ConfigError, match=r"(?s)only the values 0 and 255.*label_map: \{0: background"):
        preflight(folder_cfg(root), "run")


def test_preflight_checks_image_size_against_the_generator(tmp_path: Path) -> None:
    cfg = build_config({"data": {"image_size": [40, 40]}})
    with pytest.raises(ConfigError, match=r"data\.image_size=\[40, 40\].*multiples of 16.*\[32, 32\]"):
        preflight(cfg, "expand")
    assert preflight(cfg, "evaluate").config.perception.tasks == ["seg", "depth", "normal"]  # no generator
    # generate.supersample is checked too: 8 px x 2 fits the generator, 8 px x 3 does not
    at3 = build_config(
        {"data": {"image_size": [8, 8]}, "lumen": {"supersample": 2}, "generate": {"supersample": 3}}
    )
    with pytest.raises(
        ConfigError, match=r"data\.image_size=\[8, 8\] x generate\.supersample=3.*multiples of 16"
    ):
        preflight(at3, "expand")


def test_preflight_checks_sizes_against_the_shipped_base_a_run_would_use() -> None:
    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    (sizes,) = [c for c in preflight(demo, "expand").checks if " fits " in c]
    assert "the shipped base tiny-base" in sizes and "[128, 128]" in sizes  # lumen.supersample: 2
    at3 = demo.model_copy(update={"generate": demo.generate.model_copy(update={"supersample": 3})})
    (sizes,) = [c for c in preflight(at3, "expand").checks if " fits " in c]
    assert "[192, 192]" in sizes  # the 2x ControlNet generating at 3x
    (sizes,) = [c for c in preflight(demo, "train-base").checks if " fits " in c]
    assert "the tiny base preset" in sizes  # train-base makes a new base of base.preset


@pytest.mark.parametrize("command", ["run", "train-base", "evaluate"])
def test_a_wrong_task_list_fails_in_seconds_before_anything_starts(
    tmp_path: Path, capsys, command: str
) -> None:
    root = write_user_dataset(tmp_path / "ds", n=6, size=16)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {
        "adapter": "folder", "root": str(root), "classes": CLASSES, "label_map": {0: "background", 255: "foreground"},
    }}))  # fmt: skip
    t0 = time.monotonic()
    code = main([command, str(cfg_path), "perception.tasks=[seg, depth]", "--out", str(tmp_path / "run")])
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, (code, seconds, err)
    assert (
        "perception.tasks=[seg, depth]" in err
        and "no depth labels" in err
        and "perception.tasks=[seg]" in err
    )
    assert not (tmp_path / "run").exists()


def test_other_settings_that_do_not_fit_the_adapter_fail_at_preflight(tmp_path: Path) -> None:
    root = write_user_dataset(tmp_path / "ds", n=3, size=16)
    cfg = folder_cfg(root, label_map={0: "background", 255: "foreground"})
    for update, key in (({"report_split": "test"}, "perception.report_split"),
                        ({"arms": ["real", "real+oracle"]}, "perception.arms")):  # fmt: skip
        bad = cfg.model_copy(update={"perception": cfg.perception.model_copy(update=update)})
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            preflight(bad, "train-base")


# --------------------------------------------------------------------------------------------------
# Progress without a terminal
# --------------------------------------------------------------------------------------------------


def test_progress_without_a_terminal_logs_at_a_bounded_rate(caplog) -> None:
    from pipeline.execution import LogProgress, progress_bar

    with caplog.at_level(logging.INFO, logger="lumen.progress"):
        bar = progress_bar(range(5000), total=5000, desc="train UNet", unit="step")  # pytest: not a TTY
        assert isinstance(bar, LogProgress)
        for _ in bar:
            bar.set_postfix(loss="0.1234")
    lines = [r.getMessage() for r in caplog.records if r.name == "lumen.progress"]
    assert 5 <= len(lines) <= 11, lines
    assert lines[-1].startswith("train UNet: 100% 5000/5000 step") and "loss=0.1234" in lines[-1]


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------

TINY = {  # sizes only: nothing here is about the dataset
    "name": "userdata",
    "data": {"image_size": [RES, RES]},
    "base": {"resolution": RES},
    "layouts": {"num_components": 4, "pca_images": 8, "pca_vectors_per_image": 32, "batch_size": 4},
    "lumen": {"train_steps": 1, "batch_size": 2, "validate_every": 100, "checkpoint_every": 100},
    "generate": {"variants": 1, "steps": 2, "chunk_size": 16, "batch_size": 8},
    "perception": {"steps": 2, "seeds": [0], "batch_size": 4, "low_label_fraction": None,
                   "arms": ["real", "real+synthetic"], "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    "runner": {"max_workers": 1},
}  # fmt: skip


def test_lumen_run_end_to_end_on_greyscale_images_with_0_255_masks(tmp_path: Path, harness, capsys) -> None:
    """``lumen run`` on the user's folder: the config adds only where the data is, its classes and one
    label mapping to a sizing config. The run folder starts with a tiny base model built from a config
    dict (as tests/test_flows.py does); ``lumen run`` trains the ControlNet and does everything else."""
    from pipeline.lumen.base import build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer
    from pipeline.runs import prepare_run_dir
    from tests.test_lumen import PRESET

    root = write_user_dataset(tmp_path / "ds", n=12, size=48)
    raw = json.loads(json.dumps(TINY))
    raw["data"].update({"adapter": "folder", "root": str(root)})  # where the data is
    raw["data"]["classes"] = CLASSES  # the dataset-specific lines: classes and one label mapping
    raw["data"]["label_map"] = {0: "background", 255: "foreground"}
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(raw))
    run = prepare_run_dir(build_config(raw), tmp_path / "run")
    build_tiny_components(build_tokenizer([""], max_length=16), RES, preset=PRESET).save(run / "base")

    assert main(["run", str(tmp_path / "user.yaml"), "--out", str(run)]) == 0
    assert f"report: {run / 'report' / 'report.md'}" in capsys.readouterr().out

    summary = json.loads((run / "summaries" / "run.json").read_text())
    data = summary["data"]
    assert data["train"]["quarantined"] == data["val"]["quarantined"] == 0
    assert data["train"]["valid"] + data["val"]["valid"] == 12 and data["val"]["valid"] >= 1
    assert "data.val_fraction=0.1" in data["val"]["split"]
    assert summary["trained"] == {"base": False, "lumen": True}
    assert summary["expand"]["real_samples"] == data["train"]["valid"]
    assert summary["expand"]["synthetic_samples"] == data["train"]["valid"]

    report = json.loads((run / "report" / "report.json").read_text())
    assert list(report["tasks"]) == ["seg"]  # the default tasks are the labels the dataset has
    assert {"real", "real+synthetic", "gain"} <= set(report["tasks"]["seg"]["settings"]["full"])
    assert report["protocol"]["report_split"] == "val"
    assert report["dataset"]["classes"] == CLASSES
    resolved = load_config(run / "config.yaml")
    assert resolved.perception.tasks == ["seg"] and resolved.data.label_map == {
        0: "background",
        255: "foreground",
    }

    with tarfile.open(sorted((run / "shards" / "real").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".seg.png"))
        seg = np.asarray(Image.open(tar.extractfile(member)))  # type: ignore[arg-type]
    assert set(np.unique(seg).tolist()) <= {0, 1} and seg.max() == 1  # mapped 255 -> foreground
