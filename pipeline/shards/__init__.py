"""WebDataset shards: schema, atomic resumable writer, reader, verification (see docs/shards.md)."""

from pipeline.shards.reader import ShardPipeline, iter_samples, read_shards, shard_urls
from pipeline.shards.schema import (
    SCHEMA_VERSION,
    ModelIdentity,
    Provenance,
    ShardFormatError,
    decode_sample,
    encode_sample,
    to_sample,
    wds_decoder,
)
from pipeline.shards.verify import VerifyReport, shard_info, verify_shard_set
from pipeline.shards.writer import ShardSetError, ShardSetWriter

__all__ = [
    "SCHEMA_VERSION",
    "ModelIdentity",
    "Provenance",
    "ShardFormatError",
    "ShardPipeline",
    "ShardSetError",
    "ShardSetWriter",
    "VerifyReport",
    "decode_sample",
    "encode_sample",
    "iter_samples",
    "read_shards",
    "shard_info",
    "shard_urls",
    "to_sample",
    "verify_shard_set",
    "wds_decoder",
]
