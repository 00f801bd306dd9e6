"""Shard write and read throughput next to a raw ``tarfile`` write/read of the same bytes.

    python benchmarks/shards.py [--num 1000] [--size 128] [--image-format png] [--out benchmarks/results/shards.json]

Renders ``--num`` toy scenes once (not timed), then times, each ``--repeats`` times (median reported):

* ``lumen write``: :class:`ShardSetWriter` (encode PNG/NPY/JSON, tar, fsync, sha256, manifest);
* ``lumen write_many``: the same with ``--encode-workers`` threads encoding ahead (same bytes);
* ``encode only``: :func:`encode_sample` alone, the share of the write spent encoding;
* ``plain loop``: encode then raw ``tarfile``: what a user writing tars by hand pays;
* ``lumen write_encoded``: our container path (tar, fsync, sha256, manifest) on pre-encoded bytes;
* ``raw tarfile write``: the same encoded bytes into the same number of tars with ``tarfile``, fsynced;
* ``lumen read``: :func:`read_shards` in this process, every field decoded to numpy;
* ``lumen read, 2 workers``: the same through a torch DataLoader with 2 workers, batches of 32
  (per-sample batches would pay one shared-memory transfer per array);
* ``raw tarfile read``: every member's bytes read with ``tarfile``, nothing decoded.

Reads hit a warm page cache (the shards were just written). MB/s is shard bytes on disk per second.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from pipeline.data import Sample
from pipeline.data.toyscenes import ToyScenes
from pipeline.shards import ShardSetWriter, read_shards
from pipeline.shards.schema import encode_sample

_ARRAYS = ("image", "seg", "depth", "normal")


def _provenance(sample: Sample) -> dict[str, Any]:
    return {"source_dataset": "toyscenes", "source_key": sample.key, "split": "train"}


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the arrays of decoded samples into tensors (B, ...); keys and records stay lists."""
    out: dict[str, Any] = {k: torch.from_numpy(np.stack([b[k] for b in batch])) for k in _ARRAYS}
    out.update(__key__=[b["__key__"] for b in batch], json=[b["json"] for b in batch])
    return out


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[tuple[float, Any]]:
    """Median wall time and last result of each function, called round-robin ``repeats`` times, so
    load from other processes on a shared machine falls on every path alike."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), r) for t, r in zip(times, results, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--image-format", choices=["png", "jpg", "webp"], default="png")
    ap.add_argument("--max-samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encode-workers", type=int, default=2, help="threads of write_many")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shards.json"))
    args = ap.parse_args()

    ds = ToyScenes(num_images=args.num, image_size=(args.size, args.size))
    samples = [ds.load(k) for k in ds.keys()]
    card = ds.info.card()
    work = Path(tempfile.mkdtemp(prefix="lumen-shard-bench-"))
    try:
        # 1. Writes: ours, encoding alone, and raw tarfile with the same bytes.
        runs = iter(range(args.repeats))

        def new_writer(out: Path) -> ShardSetWriter:
            return ShardSetWriter(
                out,
                max_samples=args.max_samples,
                image_format=args.image_format,
                dataset_card=card,
                config_hash="bench",
            )

        def lumen_write() -> Path:
            out = work / f"lumen-{next(runs)}"
            with new_writer(out) as writer:
                for s in samples:
                    writer.write(s, _provenance(s))
            return out

        def lumen_write_threads() -> Path:
            out = work / f"lumen-threads-{next(runs_threads)}"
            with new_writer(out) as writer:
                writer.write_many(((s, _provenance(s)) for s in samples), workers=args.encode_workers)
            return out

        def lumen_write_encoded() -> Path:
            out = work / f"lumen-encoded-{next(runs_encoded)}"
            with new_writer(out) as writer:
                for s, fields in zip(samples, encoded, strict=True):
                    writer.write_encoded(s.key, fields)
            return out

        def encode_all() -> list[dict[str, bytes]]:
            return [
                encode_sample(s, _provenance(s), config_hash="bench", image_format=args.image_format)
                for s in samples
            ]

        def raw_write() -> Path:
            out = work / "raw"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for start in range(0, len(samples), args.max_samples):
                with open(out / f"raw-{start:06d}.tar", "wb") as f:
                    with tarfile.open(fileobj=f, mode="w") as tar:
                        for s, fields in zip(
                            samples[start : start + args.max_samples], encoded[start:], strict=False
                        ):
                            for field, data in sorted(fields.items()):
                                info = tarfile.TarInfo(f"{s.key}.{field}")
                                info.size = len(data)
                                tar.addfile(info, io.BytesIO(data))
                    f.flush()
                    os.fsync(f.fileno())
            return out

        runs_threads, runs_encoded = iter(range(args.repeats)), iter(range(args.repeats))
        encoded = encode_all()  # the inputs of the two pre-encoded paths (untimed)
        (
            (t_write, lumen_dir),
            (t_write_threads, threads_dir),
            (t_encode, _),
            (t_write_encoded, encoded_dir),
            (
                t_raw_write,
                raw_dir,
            ),
        ) = _interleaved(
            [lumen_write, lumen_write_threads, encode_all, lumen_write_encoded, raw_write], args.repeats
        )
        shard_bytes = sum(p.stat().st_size for p in lumen_dir.glob("*.tar"))
        raw_bytes = sum(p.stat().st_size for p in raw_dir.glob("*.tar"))
        identical = all(
            (work / f"lumen-{i}" / p.name).read_bytes() == p.read_bytes()
            for i in range(args.repeats)
            for p in sorted(lumen_dir.glob("*.tar"))
        ) and all(
            (d / p.name).read_bytes() == p.read_bytes()
            for d in (threads_dir, encoded_dir)
            for p in sorted(lumen_dir.glob("*.tar"))
        )

        # 2. Reads: ours (in process and with 2 workers) and raw tarfile.
        def lumen_read() -> int:
            return sum(1 for _ in read_shards(lumen_dir))

        def lumen_read_workers() -> int:
            loader: torch.utils.data.DataLoader[dict[str, Any]] = torch.utils.data.DataLoader(
                read_shards(lumen_dir), batch_size=32, num_workers=2, collate_fn=_collate
            )
            return sum(len(batch["__key__"]) for batch in loader)

        def raw_read() -> int:
            count = 0
            for path in sorted(raw_dir.glob("*.tar")):
                with tarfile.open(path, mode="r:") as tar:
                    for member in tar:
                        handle = tar.extractfile(member)
                        if handle is not None:
                            handle.read()
                            count += 1
            return count // len(encoded[0])

        t_read, n_read = _timed(lumen_read, args.repeats)
        t_read2, n_read2 = _timed(lumen_read_workers, args.repeats)
        t_raw_read, n_raw = _timed(raw_read, args.repeats)
        if not n_read == n_read2 == n_raw == args.num:
            raise RuntimeError(f"read {n_read}, {n_read2}, {n_raw} samples, expected {args.num}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("lumen write (encode + tar + fsync + sha256)", t_write, shard_bytes),
        (f"lumen write_many, encode in {args.encode_workers} threads", t_write_threads, shard_bytes),
        ("  of which encode only (1 thread)", t_encode, shard_bytes),
        ("plain loop: encode + raw tarfile (sum of two rows)", t_encode + t_raw_write, raw_bytes),
        (
            "lumen write_encoded: pre-encoded bytes (tar + fsync + sha256 + manifest)",
            t_write_encoded,
            shard_bytes,
        ),
        ("raw tarfile write, same bytes (+ fsync)", t_raw_write, raw_bytes),
        ("lumen read (decode every field), 1 process", t_read, shard_bytes),
        ("lumen read, DataLoader 2 workers, batches of 32", t_read2, shard_bytes),
        ("raw tarfile read, bytes only", t_raw_read, raw_bytes),
    ]
    result = {
        "benchmark": "shards",
        "samples": args.num,
        "image_size": args.size,
        "image_format": args.image_format,
        "max_samples": args.max_samples,
        "repeats": args.repeats,
        "shard_bytes": shard_bytes,
        "bytes_per_sample": shard_bytes / args.num,
        "byte_identical_reruns": identical,
        "encode_workers": args.encode_workers,
        # The container alone (our tar path on pre-encoded bytes vs raw tarfile on the same bytes) and
        # the whole write (ours, threaded encoding, vs the plain encode-then-tarfile loop).
        "write_ratio_container": t_raw_write / t_write_encoded,
        "write_ratio_with_encoding": (t_encode + t_raw_write) / t_write_threads,
        "write_ratio_single_thread": (t_encode + t_raw_write) / t_write,
        "rows": [
            {"operation": name.strip(), "seconds": t, "samples_per_s": args.num / t, "mb_per_s": b / 1e6 / t}
            for name, t, b in rows
        ],
        "load_average_1m": os.getloadavg()[0],  # other processes on a shared machine skew the numbers
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"python {platform.python_version()}, torch {torch.__version__}",
    }
    print(
        f"{args.num} toy scenes {args.size}x{args.size}, {args.image_format}, {shard_bytes / 1e6:.1f} MB of shards "
        f"({shard_bytes / args.num / 1e3:.0f} kB/sample); median of {args.repeats}, write paths interleaved; {result['machine']}; "
        f"load average {result['load_average_1m']:.1f}"
    )
    print("| operation | seconds | samples/s | MB/s |")
    print("|---|---:|---:|---:|")
    for name, t, b in rows:
        print(f"| {name} | {t:.2f} | {args.num / t:.0f} | {b / 1e6 / t:.0f} |")
    print(f"byte-identical reruns (and write_many / write_encoded): {identical}")
    print(
        f"write vs raw tarfile: container {result['write_ratio_container']:.2f}x, with encoding "
        f"{result['write_ratio_with_encoding']:.2f}x ({args.encode_workers} encode threads), "
        f"{result['write_ratio_single_thread']:.2f}x (1 thread); target >= 0.8x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
