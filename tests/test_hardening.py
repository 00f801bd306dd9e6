"""Hostile and broken inputs (issue #15): untrusted manifests, shards, images, labels and configs."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lumen_cli.main import main
from pipeline.config import ConfigError, build_config, load_config
from pipeline.data import FolderDataset, Quarantine, Sample, iter_valid
from pipeline.data.sample import KEY_PATTERN
from pipeline.io import LOCK_NAME, FolderLock, LockError
from pipeline.runs import RUN_MARKER, prepare_run_dir
from pipeline.shards import ShardSetError, ShardSetWriter, iter_samples, read_shards, verify_shard_set
from pipeline.shards.schema import encode_sample

REPO = Path(__file__).resolve().parents[1]
CARD = {"classes": ["a", "b"], "ignore_index": None, "depth_units": "m"}


def tiny(key: str, value: int = 0) -> Sample:
    return Sample(key=key, image=np.full((8, 8, 3), value, np.uint8), seg=np.zeros((8, 8), np.uint8))


def write_set(out: Path, samples: list[Sample]) -> Path:
    with ShardSetWriter(out, max_samples=2, dataset_card=CARD, config_hash="h") as writer:
        for s in samples:
            writer.write(s, {"source_dataset": "x", "source_key": s.key})
    return out


def set_manifest_names(directory: Path, *names: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry, name in zip(manifest["shards"], names, strict=False):
        entry["name"] = name
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------
# 1. Shard names from a manifest
# --------------------------------------------------------------------------------------------------


def test_manifest_pipe_name_is_refused_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``pipe:`` shard name in manifest.json is refused before anything opens it; no command runs."""
    write_set(tmp_path, [tiny("k-0"), tiny("k-1")])
    set_manifest_names(tmp_path, "pipe:touch PWNED;cat shard-000000.tar")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardSetError, match="invalid shard name"):
        list(iter_samples("."))
    assert not (tmp_path / "PWNED").exists()
    assert not Path("PWNED").exists()


def test_manifest_name_outside_the_set_is_refused(tmp_path: Path) -> None:
    """``../other/shard-000000.tar`` in a manifest does not read a shard of another set."""
    write_set(tmp_path / "other", [tiny("other-0")])
    target = write_set(tmp_path / "set", [tiny("k-0")])
    set_manifest_names(target, "../other/shard-000000.tar")
    with pytest.raises(ShardSetError, match="invalid shard name"):
        read_shards(target)
    assert any("invalid shard name" in p for p in verify_shard_set(target).problems)


def test_writer_refuses_to_resume_a_manifest_with_a_bad_name(tmp_path: Path) -> None:
    write_set(tmp_path / "other", [tiny("other-0")])
    target = write_set(tmp_path / "set", [tiny("k-0")])
    set_manifest_names(target, "../other/shard-000000.tar")
    with pytest.raises(ShardSetError, match="invalid shard name"):
        ShardSetWriter(target, max_samples=2, dataset_card=CARD, config_hash="h")


# --------------------------------------------------------------------------------------------------
# 8. Tar members: size cap, non-regular members
# --------------------------------------------------------------------------------------------------


def _shard_with(path: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """A shard holding sample ok-0 and the given extra members (sample big-1 gets a json too)."""
    good = encode_sample(tiny("ok-0"), {"source_dataset": "x", "source_key": "ok-0"}, config_hash="h")
    with tarfile.open(path, "w") as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(f"ok-0.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)


def _member(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, b"\0" * size


def test_oversized_member_is_skipped_unread_by_reader_and_flagged_by_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A member over ``max_member_bytes`` drops its sample with a warning; verify reports it."""
    write_set(tmp_path, [tiny("k-0")])
    shard = tmp_path / "shard-000000.tar"
    _shard_with(shard, [_member("big-1.depth.npy", 64 * 1024), _member("big-1.json", 2)])
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        keys = [d["__key__"] for d in read_shards(shard, max_member_bytes=16 * 1024)]
    assert keys == ["ok-0"]
    assert "over the cap" in caplog.text
    problems = verify_shard_set(tmp_path, max_member_bytes=16 * 1024).problems
    assert any("over the cap" in p for p in problems)


def test_symlink_member_is_reported_not_skipped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = tarfile.TarInfo("ln-1.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    shard = tmp_path / "s.tar"
    _shard_with(shard, [(link, b"")])
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        keys = [d["__key__"] for d in read_shards(shard)]
    assert keys == ["ok-0"]
    assert "ln-1" in caplog.text and "not a regular file" in caplog.text


# --------------------------------------------------------------------------------------------------
# Images and labels from an untrusted dataset folder
# --------------------------------------------------------------------------------------------------


def _folder(root: Path, stems: list[str], seg: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    if seg:
        (root / "seg").mkdir()
    for stem in stems:
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "images" / f"{stem}.png")
        if seg:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "seg" / f"{stem}.png")
    return root


def _claim_size(path: Path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR so that its header claims ``width`` x ``height`` (CRC fixed up)."""
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))


def _quarantined(ds: FolderDataset) -> tuple[list[str], dict[str, str]]:
    q = Quarantine(None)
    good = [s.key for s in iter_valid(ds, q)]
    return good, {r["key"]: r["reason"] for r in q.records}


def test_decompression_bomb_png_is_quarantined_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny PNG claiming 50000 x 50000 pixels quarantines its sample; `lumen data check` goes on."""
    root = _folder(tmp_path / "ds", ["bomb", "good"])
    _claim_size(root / "images" / "bomb.png", 50000, 50000)
    good, reasons = _quarantined(FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None))
    assert good == ["folder-good"] and reasons == {"folder-bomb": "image_too_large"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  adapter: folder\n  root: {root}\n  image_size: null\n  val_fraction: null\n")
    assert main(["data", "check", str(cfg)]) == 1  # 1 = some samples quarantined, no traceback
    assert "quarantined 1 sample(s): image_too_large" in capsys.readouterr().out


def test_image_over_the_pixel_cap_is_refused_from_its_header_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header size is checked against the cap (default 8192 x 8192) before any pixel is decoded."""
    root = _folder(tmp_path / "ds", ["big", "small"])
    _claim_size(root / "images" / "big.png", 9000, 9000)  # under PIL's own bomb limit
    decoded: list[tuple[int, int]] = []
    load = Image.Image.load

    def spy(self: Image.Image) -> Any:
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    ds = FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None)
    assert _quarantined(ds)[1] == {"folder-big": "image_too_large"}
    assert (9000, 9000) not in decoded
    capped = FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None, max_image_pixels=100)
    assert _quarantined(capped)[1] == {"folder-big": "image_too_large", "folder-small": "image_too_large"}


def test_sanitised_names_get_distinct_keys(tmp_path: Path) -> None:
    """名前.png and 日本.png both sanitise to '__': a short hash of the name keeps them apart."""
    root = _folder(tmp_path / "ds", ["名前", "日本", "plain"])
    ds = FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None)
    keys = ds.keys()
    assert len(set(keys)) == 3 and "folder-plain" in keys
    assert all(KEY_PATTERN.match(k) for k in keys)
    assert [s.key for s in iter_valid(ds, Quarantine(None))] == keys


def test_label_values_over_16_bits_are_refused_not_wrapped(tmp_path: Path) -> None:
    """A 32-bit seg value 65537 must not become class 1 through a uint16 cast."""
    root = _folder(tmp_path / "ds", ["a"], seg=True)
    # PIL opens by content: a 32-bit TIFF named .png is read as mode I
    Image.fromarray(np.full((16, 16), 65537, np.int32)).save(root / "seg" / "a.png", format="TIFF")
    assert Image.open(root / "seg" / "a.png").mode == "I"
    ds = FolderDataset(root, depth_dir=None, normal_dir=None, classes=["x", "y"])
    assert _quarantined(ds) == ([], {"folder-a": "seg_class_out_of_range"})


def test_16_bit_greyscale_images_are_scaled_or_quarantined(tmp_path: Path) -> None:
    """A 16-bit grey image is scaled to 8 bits (not clipped to 255), or quarantined when asked."""
    root = _folder(tmp_path / "ds", [])
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(root / "images" / "deep.png")
    ds = FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None)
    image = ds.load("folder-deep").image
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image == 255).mean() < 0.05 and image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    strict = FolderDataset(root, seg_dir=None, depth_dir=None, normal_dir=None, high_bit_depth="quarantine")
    assert _quarantined(strict) == ([], {"folder-deep": "image_high_bit_depth"})


def test_label_lookup_is_case_insensitive(tmp_path: Path) -> None:
    """``Upper.PNG`` finds ``seg/Upper.PNG`` (and ``seg/upper.png``), not ``seg_missing``."""
    root = _folder(tmp_path / "ds", [])
    (root / "seg").mkdir()
    for stem, img_ext, seg_name in (("Upper", ".PNG", "Upper.PNG"), ("Other", ".png", "other.Png")):
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "images" / f"{stem}{img_ext}", "PNG")
        Image.fromarray(np.ones((16, 16), np.uint8)).save(root / "seg" / seg_name, "PNG")
    ds = FolderDataset(root, depth_dir=None, normal_dir=None, classes=["x", "y"])
    good, reasons = _quarantined(ds)
    assert reasons == {} and sorted(good) == ["folder-Other", "folder-Upper"]


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcde", "bcdef", strict=True)
)  # 9**6 strings once expanded: small enough that the old code failed by copying it, not by hanging


def test_yaml_alias_bomb_fails_at_once(tmp_path: Path) -> None:
    """A billion-laughs YAML (under an unknown key) is refused while parsing, not expanded."""
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("name: x\nunknown:\n" + "".join(f"  {line}\n" for line in _LAUGHS.splitlines()))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(cfg)
    assert time.monotonic() - t0 < 2
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["data.classes=[&a x, *a]"])


def test_unknown_keys_are_checked_before_the_config_is_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[Any] = []
    real_dumps = json.dumps

    def spy(obj: Any, *args: Any, **kwargs: Any) -> str:
        copies.append(obj)
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr("pipeline.config.json.dumps", spy)
    with pytest.raises(ConfigError, match="unknown config key 'huge'"):
        build_config({"huge": ["x"] * 10})
    assert copies == []


@pytest.mark.parametrize(
    ("body", "message"),
    [("data: [\n", "not valid YAML"), ("x: !!python/object/apply:os.system [echo hi]\n", "not valid YAML")],
)
def test_yaml_errors_are_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    assert main(["config", "show", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# 4. --out never adopts a folder of other files
# --------------------------------------------------------------------------------------------------


def test_out_refuses_a_non_empty_folder_that_is_not_a_run(tmp_path: Path) -> None:
    user = tmp_path / "home"
    user.mkdir()
    (user / "started_at.txt").write_text("my notes")
    (user / "thesis.tex").write_text("precious")
    cfg = build_config({"seed": 1})
    with pytest.raises(ConfigError, match="not a lumen run folder"):
        prepare_run_dir(cfg, user)
    assert sorted(p.name for p in user.iterdir()) == ["started_at.txt", "thesis.tex"]
    (tmp_path / "empty").mkdir()
    run = prepare_run_dir(cfg, tmp_path / "empty")  # an empty folder is fine
    assert (run / RUN_MARKER).is_file() and prepare_run_dir(cfg, run) == run  # and resumes


def test_lumen_expand_refuses_a_user_folder_as_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out` on a folder of user files is one error line and exit 2, before Prefect starts."""
    user = tmp_path / "home"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main(["expand", str(REPO / "configs" / "demo.yaml"), "--out", str(user)]) == 2
    assert "not a lumen run folder" in capsys.readouterr().err
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_run_folders_made_before_the_marker_still_resume(tmp_path: Path) -> None:
    cfg = build_config({"seed": 1})
    run = prepare_run_dir(cfg, tmp_path / "run")
    (run / RUN_MARKER).unlink()
    (run / "shards").mkdir()
    assert prepare_run_dir(cfg, run) == run and (run / RUN_MARKER).is_file()


# --------------------------------------------------------------------------------------------------
# 6. One writer per shard folder and per run folder
# --------------------------------------------------------------------------------------------------


def _start_writer(out: Path) -> subprocess.Popen[str]:
    """tests/_shard_writer_proc.py: writes 4 samples into an open shard, then sleeps."""
    cmd = [sys.executable, str(REPO / "tests" / "_shard_writer_proc.py"), str(out), "8", "6", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    while (line := proc.stdout.readline().strip()) != "waiting":
        if not line:
            pytest.fail(f"writer process ended early: {proc.stderr.read()}")
    return proc


def test_second_shard_writer_fails_naming_the_first_and_leaves_its_shard_alone(tmp_path: Path) -> None:
    """A second writer on a live set raises LockError with the holder's PID instead of deleting the
    first writer's temporary shard; once the holder is killed, its stale lock is taken over."""
    out = tmp_path / "set"
    proc = _start_writer(out)
    try:
        tmp_shards = sorted(out.glob(".shard-*.tmp"))
        assert tmp_shards
        with pytest.raises(LockError, match=f"in use by PID {proc.pid}"):
            ShardSetWriter(out, max_samples=6, dataset_card=CARD, config_hash="test")
        assert sorted(out.glob(".shard-*.tmp")) == tmp_shards  # the live shard is untouched
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        (out / "manifest.json").unlink()  # the toy card differs from CARD: start a fresh set
        with ShardSetWriter(out, max_samples=6, dataset_card=CARD, config_hash="test") as writer:
            writer.write(tiny("k-0"), {"source_dataset": "x", "source_key": "k-0"})
        assert not (out / LOCK_NAME).exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_folder_lock_waits_for_its_holder_when_asked(tmp_path: Path) -> None:
    holder = FolderLock(tmp_path / "run", what="run folder").acquire()
    code = (
        "import sys, time; from pipeline.io import FolderLock, LockError\n"
        "t = time.monotonic()\n"
        "try:\n    FolderLock(sys.argv[1], wait_s=float(sys.argv[2])).acquire()\n"
        "except LockError as e:\n    print('refused', e)\n"
        "else:\n    print('got it')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", code, str(tmp_path / "run")]
    fast = subprocess.run([*run, "0"], capture_output=True, text=True, env=env, timeout=60)
    assert fast.stdout.startswith("refused") and f"PID {os.getpid()}" in fast.stdout
    waiter = subprocess.Popen([*run, "60"], stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    holder.release()
    out, _ = waiter.communicate(timeout=60)
    assert out.strip() == "got it"


# --------------------------------------------------------------------------------------------------
# 12. One error line and a distinct exit code per user-facing failure
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 4, "error: disk full"),
        (PermissionError(errno.EACCES, "Permission denied"), 5, "error: permission denied"),
        (LockError("run folder x is in use by PID 1"), 3, "error: run folder x is in use by PID 1"),
    ],
)
def test_disk_full_permission_and_lock_errors_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
    text: str,
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr("pipeline.data.preview.preview_dataset", fail)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    argv = ["data", "preview", str(cfg), "--out", str(tmp_path / "p")]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(text) and err.count("\n") == 1 and "Traceback" not in err
    assert main(["--verbose", *argv]) == code
    assert "Traceback" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 5. The ephemeral Prefect server dies with its parent
# --------------------------------------------------------------------------------------------------

SERVER_MARK = "prefect.server.api.server:create_app"


def _server_children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(c) for c in f.read().split()]
    return [c for c in found if _running(c) and SERVER_MARK in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


_FAKE_PARENT = """
import subprocess, sys, time
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{mark}"])
subprocess.Popen([sys.executable, "-I", "-S", "{script}", str(__import__("os").getpid())],
                 start_new_session=True)
print(server.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_watchdog_stops_the_server_children_of_a_killed_process(sig: signal.Signals) -> None:
    """flows/_watchdog.py stops a (stand-in) server child within seconds of its parent's death."""
    code = _FAKE_PARENT.format(mark=SERVER_MARK, script=REPO / "flows" / "_watchdog.py")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server = 0
    try:
        assert parent.stdout is not None
        server = int(parent.stdout.readline())
        time.sleep(1.0)  # the watchdog polls every 0.25 s
        assert _running(server)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        assert _gone_within([server], 10), "server survived its parent"
    finally:
        parent.kill()
        parent.wait(timeout=30)
        if server and _running(server):  # leave nothing behind when the test fails
            os.kill(server, signal.SIGKILL)


LUMEN = [sys.executable, "-m", "lumen_cli"]
TINY_RUN = [
    "data.num_images=8", "data.num_val_images=4", "generate.variants=1", "generate.steps=2",
    "perception.steps=2", "perception.seeds=[0]", "perception.num_test_images=4",
]  # fmt: skip


SLOW = pytest.mark.skipif(os.environ.get("LUMEN_SLOW") != "1", reason="a minute per lumen run; LUMEN_SLOW=1")


def _lumen_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a `lumen` subprocess with its own Prefect home (and so its own ephemeral server)."""
    (tmp_path / "prefect").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1", PREFECT_LOGGING_LEVEL="WARNING")
    return {**env, **extra}


@pytest.mark.slow
@SLOW
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_lumen_run_leaves_no_prefect_server(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGKILL or SIGTERM of `lumen run` during expand: its ephemeral Prefect server is gone within
    seconds (it used to live on with PPID 1)."""
    out = tmp_path / "run"
    cmd = [*LUMEN, "run", str(REPO / "configs" / "demo.yaml"), *TINY_RUN, "--out", str(out)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_lumen_env(tmp_path), stdout=log, stderr=log)
    try:
        deadline, servers = time.monotonic() + 240, []
        while time.monotonic() < deadline and proc.poll() is None:
            servers = servers or _server_children(proc.pid)
            if servers and (out / "work" / "expand").is_dir():
                break
            time.sleep(0.2)
        assert servers and proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert _gone_within(servers, 10), f"Prefect server {servers} survived `lumen run` ({sig.name})"
        assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
@SLOW
def test_two_lumen_expand_on_one_out_one_fails_fast_one_waits(tmp_path: Path) -> None:
    """Two `lumen expand` on one --out: while the first works, a second fails at once naming its PID
    (exit 3), and one with LUMEN_LOCK_WAIT_S waits for it, then finds the work done. Shards verify.
    (They share a Prefect home: the second server to start finds its database ready.)"""
    out = tmp_path / "run"
    cmd = [*LUMEN, "expand", str(REPO / "configs" / "demo.yaml"), *TINY_RUN, "--out", str(out)]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("first", "fast", "waiting")}  # noqa: SIM115
    first = subprocess.Popen(
        cmd, cwd=REPO, env=_lumen_env(tmp_path), stdout=logs["first"], stderr=logs["first"]
    )
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            if (out / LOCK_NAME).is_file() and f"PID {first.pid}" in (out / LOCK_NAME).read_text():
                break
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        second = [
            subprocess.Popen(
                cmd, cwd=REPO, env=_lumen_env(tmp_path, **wait), stdout=logs[name], stderr=logs[name]
            )
            for name, wait in (("fast", {}), ("waiting", {"LUMEN_LOCK_WAIT_S": "600"}))
        ]
        assert second[0].wait(timeout=300) == 3
        assert first.poll() is None  # the second gave up while the first was still working
        fast = (tmp_path / "fast.log").read_text()
        assert (
            f"error: run folder {out.resolve()} is in use by PID {first.pid}" in fast
            and "Traceback" not in fast
        )
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert second[1].wait(timeout=600) == 0, (tmp_path / "waiting.log").read_text()[-3000:]
    finally:
        for proc in (first, *locals().get("second", [])):
            proc.kill()
            proc.wait(timeout=30)
        for log in logs.values():
            log.close()
    for kind in ("real", "synthetic"):
        report = verify_shard_set(out / "shards" / kind)
        assert report.ok, report.summary()
    assert not (out / LOCK_NAME).exists()


def test_lumen_expand_on_a_run_folder_in_use_exits_3_before_prefect_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run folder is locked before Prefect starts: a second `lumen expand` fails in seconds."""
    out = tmp_path / "run"
    demo = str(REPO / "configs" / "demo.yaml")
    code = (
        "import sys, time\n"
        "from pipeline.config import load_config\nfrom pipeline.io import FolderLock\n"
        "from pipeline.runs import prepare_run_dir\n"
        "run = prepare_run_dir(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])\n"
        "FolderLock(run, what='run folder').acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, demo, str(out), *TINY_RUN], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        assert main(["expand", demo, *TINY_RUN, "--out", str(out)]) == 3
        assert time.monotonic() - t0 < 30
        err = capsys.readouterr().err
        assert err.startswith(f"error: run folder {out.resolve()} is in use by PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
