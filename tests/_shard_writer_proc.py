"""Subprocess writer for the crash test in test_shards.py (not collected by pytest).

Usage: python tests/_shard_writer_proc.py OUT_DIR NUM_IMAGES MAX_SAMPLES STOP_AFTER

Writes toy-scene samples in key order, skipping keys already in the set, and prints each key once it
is written. After STOP_AFTER samples it prints ``waiting`` and sleeps, so the parent can SIGKILL it
in the middle of a shard.
"""

from __future__ import annotations

import sys
import time

from pipeline.data.toyscenes import ToyScenes
from pipeline.shards.writer import ShardSetWriter


def main(out_dir: str, num_images: int, max_samples: int, stop_after: int) -> None:
    ds = ToyScenes(num_images=num_images, image_size=(32, 32))
    writer = ShardSetWriter(out_dir, max_samples=max_samples, dataset_card=ds.info.card(), config_hash="test")
    written = 0
    for key in ds.keys():
        if key in writer.done_keys:
            continue
        writer.write(ds.load(key), {"source_dataset": "toyscenes", "source_key": key, "split": "train"})
        written += 1
        print(key, flush=True)
        if written == stop_after:
            print("waiting", flush=True)
            time.sleep(120)
    writer.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
