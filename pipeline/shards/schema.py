"""The shard schema: how a :class:`~pipeline.data.Sample` and its provenance become tar members, and back.

One sample is a group of tar members ``{key}.{field}`` (see ``docs/shards.md``):

========================  =====================================================================
field                     content
========================  =====================================================================
``image.png|jpg|webp``    (H, W, 3) uint8 RGB
``seg.png``               (H, W) uint8 (8-bit grey PNG) or uint16 (16-bit grey PNG) class ids
``depth.npy``             (H, W) float32 or float16 depth in the dataset's units, 0 = invalid
``normal.npy``            (H, W, 3) float32 or float16 camera-frame unit normals, 0 = invalid
``layout.npy``            (N, h, w) float16 or float32 neural layout (optional)
``json``                  provenance record (a JSON object, UTF-8)
========================  =====================================================================

Decoding never unpickles (``allow_pickle=False``) and rejects member names that are not
``{key}.{field}`` with a valid key, so a hostile tar cannot smuggle paths or pickles in.
:func:`wds_decoder` plugs the same decoding into a stock ``webdataset.WebDataset(...).decode(...)``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import pipeline
from pipeline.data.sample import Sample, check_key

__all__ = [
    "FIELDS",
    "IMAGE_FIELDS",
    "SCHEMA_VERSION",
    "FloatDtype",
    "ImageFormat",
    "ModelIdentity",
    "Provenance",
    "ShardFormatError",
    "build_record",
    "decode_field",
    "decode_sample",
    "encode_sample",
    "iter_tar_samples",
    "parse_member_name",
    "to_sample",
    "wds_decoder",
]

SCHEMA_VERSION = 1
"""Version of the shard schema; bumped on any incompatible change. Readers reject newer versions."""

ImageFormat = Literal["png", "jpg", "webp"]
FloatDtype = Literal["float32", "float16"]

IMAGE_FIELDS: dict[str, str] = {"png": "image.png", "jpg": "image.jpg", "webp": "image.webp"}
FIELDS: frozenset[str] = frozenset(
    {*IMAGE_FIELDS.values(), "seg.png", "depth.npy", "normal.npy", "layout.npy", "json"}
)
"""Every field (member-name suffix after ``{key}.``) a shard may contain."""

_MEMBER = re.compile(r"^([A-Za-z0-9_-]+)\.(" + "|".join(re.escape(f) for f in sorted(FIELDS)) + r")$")
_RECORD_REQUIRED = ("schema_version", "key", "source_dataset", "source_key", "synthetic")
_SHA256 = r"^[0-9a-f]{64}$"


class ShardFormatError(ValueError):
    """A sample or shard that does not follow the schema; the message names the key and the field."""


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


class ModelIdentity(BaseModel):
    """A model used to make a sample: hub id or folder, and the sha256 of its weights when known."""

    model_config = ConfigDict(extra="forbid")

    id: str
    sha256: str | None = Field(None, pattern=_SHA256)


class Provenance(BaseModel):
    """Where a sample came from. Real and synthetic samples use the same record.

    The writer adds ``schema_version``, ``key``, ``caption``, ``meta``, ``config_hash`` and
    ``package_version``. It never reads the clock: pass ``timestamp`` (ISO 8601, UTC) when it means
    something (e.g. when a variant was generated), so that the same input gives byte-identical shards.
    """

    model_config = ConfigDict(extra="forbid")

    source_dataset: str = Field(description="dataset adapter/name of the real sample, e.g. 'toyscenes'")
    source_key: str = Field(description="key of the real sample (a synthetic variant's source image)")
    split: str | None = None
    synthetic: bool = False
    variant: int | None = Field(None, ge=0, description="variant index of a synthetic sample")
    seed: int | None = None
    prompt: str | None = None
    guidance: float | None = None
    conditioning_scale: float | None = Field(None, description="ControlNet residual scale")
    steps: int | None = Field(None, ge=1)
    scheduler: str | None = None
    strength: float | None = Field(
        None, gt=0, lt=1, description="set when a variant started from its source image (generate.strength)"
    )
    condition_guidance: bool | None = Field(
        None, description="set when guidance also amplified the layout (generate.condition_guidance)"
    )
    layout_sharpen: tuple[float, int] | None = Field(
        None, description="set when the layout was sharpened: (amount, radius px) (generate.layout_sharpen)"
    )
    layout_guidance: float | None = Field(
        None, ge=0, description="set when the layout had its own guidance weight (generate.layout_guidance)"
    )
    layout_sharpen_until: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="set when only the first steps saw the sharpened layout: their share "
        "(generate.layout_sharpen_until)",
    )
    layout_supersample: tuple[int, float] | None = Field(
        None,
        description="set when the later steps saw layouts made at a finer size: (factor, share of the first "
        "steps that saw the usual layouts) (generate.layout_supersample, layout_supersample_after)",
    )
    models: dict[str, ModelIdentity] = Field(default_factory=dict, description="role -> model, e.g. 'base'")
    layout: dict[str, Any] | None = Field(
        None, description="layout spec: backbone, layer, timestep, PCA hash, N"
    )
    timestamp: str | None = None
    quality: dict[str, float] | None = None
    label_source: str | None = Field(
        None, description="generated from a label map (no real image): 'dataset-seg' or 'label_dir:<folder>'"
    )
    edits: list[dict[str, Any]] | None = Field(
        None, description="layout edits that made the label map from its source map (op and parameters)"
    )
    class_edit: dict[str, Any] | None = Field(
        None, description="class-specific appearance edit: class, direction, strength (generate.class_edits)"
    )
    selection: dict[str, Any] | None = Field(
        None,
        description="set when the variant was chosen among candidates (generate.candidates): candidates, "
        "score, chosen (0 = the variant's own seed) and its layout_agreement",
    )

    @model_validator(mode="after")
    def _synthetic_needs_variant(self) -> Provenance:
        if self.synthetic and (self.variant is None or self.seed is None):
            raise ValueError("a synthetic sample needs 'variant' and 'seed' in its provenance")
        return self


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars and arrays found in ``Sample.meta``."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; store plain values in Sample.meta")


def build_record(
    sample: Sample, provenance: Provenance | Mapping[str, Any], config_hash: str
) -> dict[str, Any]:
    """The ``json`` record of a sample: validated provenance plus key, caption, meta and versions."""
    try:
        prov = (
            provenance if isinstance(provenance, Provenance) else Provenance.model_validate(dict(provenance))
        )
    except ValidationError as err:
        raise ShardFormatError(f"{sample.key}: invalid provenance: {err}") from None
    record = prov.model_dump(mode="json")
    record.update(
        schema_version=SCHEMA_VERSION,
        key=sample.key,
        caption=sample.caption,
        meta=sample.meta,
        config_hash=config_hash,
        package_version=pipeline.__version__,
    )
    return record


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    """NPY v1 bytes of a C-contiguous little-endian copy of ``arr`` (deterministic)."""
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _image_bytes(image: np.ndarray, fmt: ImageFormat, quality: int, png_level: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=png_level)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, lossless=quality == 100)
    else:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FIELDS)}, got {fmt!r}")
    return buf.getvalue()


def _check_float(
    key: str, name: str, arr: np.ndarray, shape: tuple[int, ...], dtype: FloatDtype
) -> np.ndarray:
    if arr.shape != shape:
        raise ShardFormatError(f"{key}: {name} has shape {arr.shape}, expected {shape} (the image size)")
    if arr.dtype.kind != "f":
        raise ShardFormatError(f"{key}: {name} must be a float array, got {arr.dtype}")
    out = arr.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        raise ShardFormatError(
            f"{key}: {name} has NaN/inf values (after casting to {dtype}); mark invalid pixels with 0"
        )
    return out


def encode_sample(
    sample: Sample,
    provenance: Provenance | Mapping[str, Any],
    *,
    config_hash: str,
    image_format: ImageFormat = "png",
    image_quality: int = 95,
    png_compress_level: int = 3,
    depth_dtype: FloatDtype = "float32",
    normal_dtype: FloatDtype = "float32",
    layout: np.ndarray | None = None,
) -> dict[str, bytes]:
    """Encode one sample into its tar fields ``{field: bytes}`` (no ``__key__``).

    Args:
        sample: image (H, W, 3) uint8; optional seg (H, W) uint8/uint16, depth (H, W) float,
            normal (H, W, 3) float. ``caption`` and ``meta`` go into the ``json`` record.
        provenance: a :class:`Provenance` or a dict validated into one.
        config_hash: hash of the config that produced the sample, recorded in the ``json``.
        image_format: ``png`` (lossless), ``jpg`` or ``webp``.
        image_quality: jpg/webp quality; webp at 100 is lossless.
        png_compress_level: zlib level 0-9 of the PNGs (lossless at any level; 3 is ~2x faster than 6).
        depth_dtype, normal_dtype: storage dtype; float16 halves the size and is lossy.
        layout: optional (N, h, w) float16/float32 neural layout, stored as given.

    Raises:
        ShardFormatError: a field has the wrong shape, dtype or non-finite values.
    """
    key = check_key(sample.key)
    image = np.asarray(sample.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ShardFormatError(f"{key}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    hw = image.shape[:2]
    fields = {
        IMAGE_FIELDS[image_format]: _image_bytes(image, image_format, image_quality, png_compress_level)
    }
    if sample.seg is not None:
        seg = np.asarray(sample.seg)
        if seg.shape != hw or seg.dtype not in (np.uint8, np.uint16):
            raise ShardFormatError(f"{key}: seg must be {hw} uint8 or uint16, got {seg.shape} {seg.dtype}")
        fields["seg.png"] = _image_bytes(np.ascontiguousarray(seg), "png", 100, png_compress_level)
    if sample.depth is not None:
        fields["depth.npy"] = _npy_bytes(
            _check_float(key, "depth", np.asarray(sample.depth), hw, depth_dtype)
        )
    if sample.normal is not None:
        normal = _check_float(key, "normal", np.asarray(sample.normal), (*hw, 3), normal_dtype)
        fields["normal.npy"] = _npy_bytes(normal)
    if layout is not None:
        fields["layout.npy"] = _npy_bytes(_check_layout(key, np.asarray(layout)))
    record = build_record(sample, provenance, config_hash)
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)  # fmt: skip
    fields["json"] = text.encode("utf-8")
    return fields


def _check_layout(key: str, layout: np.ndarray) -> np.ndarray:
    if layout.ndim != 3 or layout.dtype not in (np.float16, np.float32) or not np.isfinite(layout).all():
        raise ShardFormatError(
            f"{key}: layout must be finite (N, h, w) float16/float32, got {layout.shape} {layout.dtype}"
        )
    return layout


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as pil:
        if pil.format not in ("PNG", "JPEG", "WEBP"):
            raise ShardFormatError(f"image is {pil.format}, expected PNG, JPEG or WebP")
        return np.array(pil.convert("RGB") if pil.mode != "RGB" else pil)  # a writable copy


def _decode_seg(data: bytes) -> np.ndarray:
    """8-bit grey or palette PNG -> uint8; 16-bit grey PNG -> uint16 (the stock decoder flattens these)."""
    with Image.open(io.BytesIO(data)) as pil:
        if pil.format != "PNG":
            raise ShardFormatError(f"seg is {pil.format}, expected PNG")
        if pil.mode in ("L", "P"):
            return np.array(pil, dtype=np.uint8)
        if pil.mode.startswith("I;16"):
            return np.array(pil).astype(np.uint16, copy=False)
        if pil.mode == "I":
            arr = np.array(pil)
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ShardFormatError("seg has class ids outside 0..65535")
            return arr.astype(np.uint16)
        raise ShardFormatError(f"seg PNG has mode {pil.mode}; expected 8-bit or 16-bit greyscale")


def _decode_npy(data: bytes, name: str) -> np.ndarray:
    arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.kind != "f":
        raise ShardFormatError(f"{name} must hold floats, got {arr.dtype}")
    return arr


def decode_field(field: str, data: bytes) -> Any:
    """Decode one field's bytes.

    Returns: ``image.*`` (H, W, 3) uint8; ``seg.png`` (H, W) uint8/uint16; ``depth.npy`` (H, W) float32;
    ``normal.npy`` (H, W, 3) float32; ``layout.npy`` (N, h, w) as stored (float16/float32);
    ``json`` a dict.
    """
    if field in IMAGE_FIELDS.values():
        return _decode_image(data)
    if field == "seg.png":
        return _decode_seg(data)
    if field in ("depth.npy", "normal.npy"):
        return _decode_npy(data, field).astype(np.float32, copy=False)
    if field == "layout.npy":
        return _decode_npy(data, field)
    if field == "json":
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ShardFormatError(f"json must be an object, got {type(record).__name__}")
        return record
    raise ShardFormatError(f"unknown field {field!r}; valid fields: {', '.join(sorted(FIELDS))}")


def _check_decoded(key: str, out: dict[str, Any]) -> None:
    """Schema checks across fields: label shapes match the image, the record matches the key."""
    hw = out["image"].shape[:2]
    expected = {"seg": hw, "depth": hw, "normal": (*hw, 3)}
    for name, shape in expected.items():
        if name in out and out[name].shape != shape:
            raise ShardFormatError(
                f"{key}: {name} has shape {out[name].shape}, expected {shape} (the image size)"
            )
    if "layout" in out and out["layout"].ndim != 3:
        raise ShardFormatError(f"{key}: layout must be (N, h, w), got shape {out['layout'].shape}")
    record = out["json"]
    missing = [k for k in _RECORD_REQUIRED if k not in record]
    if missing:
        raise ShardFormatError(f"{key}: json lacks {', '.join(missing)}")
    version = record["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ShardFormatError(
            f"{key}: schema_version {version!r} is newer than {SCHEMA_VERSION}; upgrade lumen"
        )
    if record["key"] != key:
        raise ShardFormatError(f"{key}: json says key {record['key']!r}")


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a raw WebDataset sample ``{"__key__", "__url__", "image.png": bytes, ...}``.

    Usable with a stock pipeline: ``wds.WebDataset(urls, shardshuffle=False).map(decode_sample)``.

    Returns:
        ``{"__key__", "__url__", "image", "json"}`` plus whichever of ``"seg"``, ``"depth"``,
        ``"normal"``, ``"layout"`` the sample has (dtypes as in :func:`decode_field`).

    Raises:
        ShardFormatError: invalid key, unknown/missing field, undecodable data, wrong shapes.
    """
    key = str(raw.get("__key__"))
    try:
        check_key(key)
    except ValueError as err:
        raise ShardFormatError(str(err)) from None
    out: dict[str, Any] = {"__key__": key, "__url__": raw.get("__url__")}
    for field, data in raw.items():
        if field.startswith("__"):
            continue
        if field not in FIELDS:
            raise ShardFormatError(
                f"{key}: unknown field {field!r}; valid fields: {', '.join(sorted(FIELDS))}"
            )
        name = "image" if field in IMAGE_FIELDS.values() else field.split(".")[0]
        if name in out:
            raise ShardFormatError(f"{key}: more than one {name} field")
        try:
            out[name] = decode_field(field, data)
        except ShardFormatError as err:
            raise ShardFormatError(f"{key}: {err}") from None
        except Exception as err:  # PIL, numpy and json raise many types on corrupt bytes
            raise ShardFormatError(f"{key}: cannot decode {field}: {type(err).__name__}: {err}") from err
    for name in ("image", "json"):
        if name not in out:
            raise ShardFormatError(f"{key}: missing the {name} field")
    _check_decoded(key, out)
    return out


def wds_decoder(key: str, data: bytes) -> Any:
    """A ``webdataset`` decoder handler: ``wds.WebDataset(urls, shardshuffle=False).decode(wds_decoder)``.

    ``key`` is the extension as webdataset passes it (``".seg.png"``). Fields keep their names
    (``sample["seg.png"]``). Unknown fields raise instead of falling through to webdataset's default
    handlers, which would unpickle ``.pyd``/``.pickle`` members.
    """
    return decode_field(key.lstrip(".").lower(), data)


def to_sample(decoded: Mapping[str, Any]) -> Sample:
    """Turn a :func:`decode_sample` dict into a :class:`Sample` (caption and meta from the json)."""
    record = decoded["json"]
    return Sample(
        key=decoded["__key__"],
        image=decoded["image"],
        seg=decoded.get("seg"),
        depth=decoded.get("depth"),
        normal=decoded.get("normal"),
        caption=str(record.get("caption", "")),
        meta=dict(record.get("meta") or {}),
    )


# --------------------------------------------------------------------------------------------------
# Tar members
# --------------------------------------------------------------------------------------------------


def parse_member_name(name: str) -> tuple[str, str]:
    """Split a member name into ``(key, field)``; reject paths, ``..``, bad keys and unknown fields."""
    match = _MEMBER.match(name)
    if match is None:
        raise ShardFormatError(
            f"invalid member name {name!r}: expected KEY.FIELD with KEY of letters, digits, '_', '-' "
            f"and FIELD one of {', '.join(sorted(FIELDS))}"
        )
    return match.group(1), match.group(2)


MAX_MEMBER_BYTES = 512 * 1024 * 1024
"""Default cap on one tar member's size when reading shards: larger members are refused unread."""


def iter_tar_samples(
    tar: tarfile.TarFile,
    fields: Iterable[str] | Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of an open tar into ``(key, {field: bytes})``, in file order.

    Args:
        tar: an open ``tarfile.TarFile`` (``mode="r:"`` lets unread members be skipped by seeking).
        fields: only read these fields' bytes (others appear with ``b""``); None reads all.
        max_member_bytes: a member to read that is larger than this raises before it is read.

    Raises:
        ShardFormatError: non-regular member, invalid name, a field twice, a key split across
            non-adjacent members (i.e. a duplicate key), or a member over ``max_member_bytes``.
        tarfile.TarError, EOFError, OSError: a truncated or corrupt tar.
    """
    if fields is None or callable(fields):
        wanted = fields
    else:
        wanted_set = frozenset(fields)
        wanted = wanted_set.__contains__
    seen: set[str] = set()
    current: str | None = None
    group: dict[str, bytes] = {}
    for member in tar:
        if not member.isreg():
            raise ShardFormatError(f"member {member.name!r} is not a regular file")
        key, field = parse_member_name(member.name)
        if key != current:
            if current is not None:
                yield current, group
            if key in seen:
                raise ShardFormatError(f"key {key!r} appears twice (members not adjacent)")
            seen.add(key)
            current, group = key, {}
        if field in group:
            raise ShardFormatError(f"{key}: field {field!r} appears twice")
        if wanted is None or wanted(field):
            if member.size > max_member_bytes:
                raise ShardFormatError(
                    f"member {member.name!r} has {member.size} bytes, over the cap of {max_member_bytes}"
                )
            handle = tar.extractfile(member)
            if handle is None:  # pragma: no cover - regular files always have a handle
                raise ShardFormatError(f"cannot read member {member.name!r}")
            data = handle.read()
            if len(data) != member.size:
                raise ShardFormatError(f"member {member.name!r} is truncated")
            group[field] = data
        else:
            group[field] = b""
    if current is not None:
        yield current, group
