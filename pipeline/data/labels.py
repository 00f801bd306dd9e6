"""Label mappings: how the values (or colours) stored in a dataset's mask files become class ids.

Masks are stored in many ways: binary masks as 0/255, colour-coded PNGs (Cityscapes, ADE20K, the
CamVid colour release), 8- or 16-bit id masks whose ids do not match the class list. ``data.label_map``
says what each stored value or colour means, and ``data.ignore_values`` which ones mark unlabelled
pixels (they become ``data.ignore_index``)::

    data:
      classes: [background, foreground]
      label_map: {0: background, 255: foreground}          # a binary 0/255 mask
      # label_map: {"#804080": road, "#f423e8": sidewalk}   # colour-coded masks (also "128,64,128")
      # ignore_values: ["#000000"]                          # -> data.ignore_index

:class:`LabelMap` is the parsed, validated mapping; :func:`advise` looks at the raw values of masks
that failed validation and writes the config lines that would fix them (``lumen data check``, the
preflight of ``lumen run``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.sample import SampleError

__all__ = [
    "SEG_VALUE_REASONS",
    "LabelAdvice",
    "LabelMap",
    "MaskStats",
    "advise",
    "format_colour",
    "parse_label_key",
]

KeyKind = Literal["value", "colour"]
Colour = tuple[int, int, int]

SEG_VALUE_REASONS = ("seg_class_out_of_range", "seg_unmapped_value", "seg_bad_mode")
"""Quarantine reasons that a label mapping (or a class list) can fix."""

_COLOUR_TEXT = re.compile(r"^[\[(]?\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*[\])]?$")
_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")


def format_colour(rgb: Sequence[int]) -> str:
    """``"#rrggbb"`` of an (r, g, b) triple."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def parse_label_key(key: object, where: str) -> int | str:
    """A label value (int, or a string of digits) or a colour, canonical: an int or ``"#rrggbb"``.

    Colours are written ``"#804080"``, ``"128,64,128"``, ``"[128, 64, 128]"`` or as a 3-list.
    Raises ``ValueError`` naming ``where`` (the config key).
    """
    if isinstance(key, bool):
        raise ValueError(f"{where}: {key!r} is not a label value or colour")
    if isinstance(key, int):
        if not 0 <= key <= 65535:
            raise ValueError(f"{where}: label value {key} is outside 0..65535 (8- or 16-bit masks)")
        return key
    if isinstance(key, (list, tuple)):
        key = ",".join(str(c) for c in key)
    if isinstance(key, str):
        text = key.strip()
        if text.isdigit():
            return parse_label_key(int(text), where)
        if m := _HEX.match(text):
            return "#" + m.group(1).lower()
        if m := _COLOUR_TEXT.match(text):
            rgb = [int(g) for g in m.groups()]
            if max(rgb) > 255:
                raise ValueError(f"{where}: colour {key!r} has a channel above 255")
            return format_colour(rgb)
    raise ValueError(
        f"{where}: {key!r} is neither a label value (an integer such as 255) nor an RGB colour "
        '("#804080", "128,64,128" or [128, 64, 128])'
    )


def _kind(key: int | str) -> KeyKind:
    return "value" if isinstance(key, int) else "colour"


def _colour_code(text: str) -> int:
    return int(text[1:], 16)


@dataclass(frozen=True)
class LabelMap:
    """A validated mapping of stored mask values (or colours) to class ids.

    Attributes:
        kind: ``value`` (single-channel masks: 8- or 16-bit values) or ``colour`` (RGB masks).
        table: stored value -> class id (colours as 24-bit codes ``r << 16 | g << 8 | b``); empty when
            only ``ignore`` is given, in which case other values pass through unchanged.
        ignore: stored values (or colour codes) that become ``ignore_index``.
        ignore_index: the id of unlabelled pixels.
    """

    kind: KeyKind
    table: Mapping[int, int]
    ignore: frozenset[int] = frozenset()
    ignore_index: int | None = None
    _names: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(
        cls,
        label_map: Mapping[int | str, int | str] | None,
        ignore_values: Sequence[int | str] | None,
        classes: Sequence[str] | None,
        ignore_index: int | None,
    ) -> LabelMap | None:
        """Parse and check ``data.label_map`` / ``data.ignore_values`` (None when neither is set).

        Raises ``ValueError`` naming the key: unknown class names, ids out of range, value and colour
        keys mixed, ignore values without an ignore index.
        """
        if not label_map and not ignore_values:
            return None
        classes = list(classes or [])
        parsed = {parse_label_key(k, f"data.label_map key {k!r}"): v for k, v in (label_map or {}).items()}
        ignored = [parse_label_key(v, f"data.ignore_values entry {v!r}") for v in ignore_values or ()]
        kinds = {_kind(k) for k in [*parsed, *ignored]}
        if len(kinds) > 1:
            raise ValueError(
                "data.label_map / data.ignore_values mix label values and colours: use integers for "
                'single-channel masks, or colours ("#804080") for RGB masks, not both'
            )
        kind: KeyKind = kinds.pop()
        if kind == "colour" and not parsed:
            raise ValueError(
                "data.ignore_values lists colours, but there is no colour data.label_map: map every "
                "colour of the masks to a class in data.label_map"
            )
        if ignored and ignore_index is None:
            raise ValueError(
                "data.ignore_values needs data.ignore_index, the id unlabelled pixels get "
                "(e.g. data.ignore_index=255, outside 0..len(data.classes)-1)"
            )
        both = set(parsed) & set(ignored)
        if both:
            raise ValueError(f"data.label_map and data.ignore_values both list {sorted(both, key=str)}")
        table = {_code(k): _class_id(v, classes, f"data.label_map[{_show(k)}]") for k, v in parsed.items()}
        names = {_code(k): _show(k) for k in [*parsed, *ignored]}
        return cls(kind, table, frozenset(_code(k) for k in ignored), ignore_index, names)

    def apply(self, stored: np.ndarray, file: str | None = None) -> np.ndarray:
        """Class ids of a stored mask: (H, W) values, or (H, W, 3) uint8 colours for ``kind=colour``.

        Raises :class:`SampleError` (``seg_unmapped_value``) listing values the mapping does not cover.
        """
        codes = _colour_codes(stored) if self.kind == "colour" else stored.astype(np.int64)
        uniq, inverse = np.unique(codes, return_inverse=True)
        out = np.empty(len(uniq), np.int64)
        missing = []
        for i, u in enumerate(uniq.tolist()):
            if u in self.ignore and self.ignore_index is not None:  # from_config pairs them
                out[i] = self.ignore_index
            elif u in self.table:
                out[i] = self.table[u]
            elif not self.table and self.kind == "value":  # only ignore values given: ids pass through
                out[i] = u
            else:
                missing.append(u)
        if missing:
            raise SampleError("seg_unmapped_value", self._unmapped_detail(missing), file)
        ids = out[inverse].reshape(codes.shape)
        return ids.astype(np.uint8) if ids.size == 0 or ids.max() < 256 else ids.astype(np.uint16)

    def _unmapped_detail(self, missing: list[int]) -> str:
        what = "colours" if self.kind == "colour" else "label values"
        shown = [format_colour(_rgb(m)) if self.kind == "colour" else str(m) for m in missing[:8]]
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        known = ", ".join(self._names[k] for k in sorted(self._names)) or "none"
        return (
            f"{what} {', '.join(shown)}{more} are not in data.label_map or data.ignore_values "
            f"(mapped: {known}); add them to one of the two"
        )


def _code(key: int | str) -> int:
    return key if isinstance(key, int) else _colour_code(key)


def _show(key: int | str) -> str:
    return str(key) if isinstance(key, int) else f'"{key}"'


def _rgb(code: int) -> Colour:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
    """(H, W) int64 codes ``r << 16 | g << 8 | b`` of an (H, W, 3) uint8 image."""
    arr = rgb.astype(np.int64)
    return (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]


def _class_id(value: int | str, classes: Sequence[str], where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a class name or id")
    if isinstance(value, int):
        if not 0 <= value < max(len(classes), 1) or not classes:
            raise ValueError(
                f"{where}: class id {value} is outside 0..{len(classes) - 1} (data.classes has "
                f"{len(classes)} names)"
            )
        return value
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    if isinstance(value, str) and value.strip().isdigit():
        return _class_id(int(value), classes, where)
    valid = ", ".join(classes) if classes else "none: set data.classes"
    raise ValueError(f"{where}: {value!r} is not a class of data.classes ({valid})")


# --------------------------------------------------------------------------------------------------
# Advice: which config lines would make masks that failed validation usable
# --------------------------------------------------------------------------------------------------


# Colours of two common palettes, to name the colours of a colour-coded mask (a guess to check).
KNOWN_COLOURS: dict[Colour, str] = {
    # Cityscapes (train ids' colours)
    (128, 64, 128): "road", (244, 35, 232): "sidewalk", (70, 70, 70): "building", (102, 102, 156): "wall",
    (190, 153, 153): "fence", (153, 153, 153): "pole", (250, 170, 30): "traffic_light",
    (220, 220, 0): "traffic_sign", (107, 142, 35): "vegetation", (152, 251, 152): "terrain",
    (70, 130, 180): "sky", (220, 20, 60): "person", (255, 0, 0): "rider", (0, 0, 142): "car",
    (0, 0, 70): "truck", (0, 60, 100): "bus", (0, 80, 100): "train", (0, 0, 230): "motorcycle",
    (119, 11, 32): "bicycle",
    # CamVid (the 11 classes' colours in the colour release)
    (128, 128, 128): "sky", (128, 0, 0): "building", (192, 192, 128): "pole", (0, 0, 192): "pavement",
    (128, 128, 0): "tree", (192, 128, 128): "sign", (64, 64, 128): "fence", (64, 0, 128): "car",
    (64, 64, 0): "pedestrian", (0, 128, 192): "bicyclist",
}  # fmt: skip
VOID_COLOURS = frozenset({(0, 0, 0)})


@dataclass
class MaskStats:
    """What the stored masks of some samples hold, read without any mapping.

    Attributes:
        values: single-channel masks: stored value -> pixel count.
        colours: RGB masks: colour -> pixel count.
        modes: PIL modes of the files read, with counts.
        files: number of mask files read.
    """

    values: Counter[int] = field(default_factory=Counter)
    colours: Counter[Colour] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    files: int = 0

    def add_file(self, path: Path) -> None:
        """Count the values (or colours) of one mask file; unreadable files are skipped."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                arr = np.asarray(img.convert("RGB") if mode in ("RGB", "RGBA", "CMYK") else img)
        except (OSError, SyntaxError, ValueError):
            return
        self.files += 1
        self.modes[mode] += 1
        if arr.ndim == 3:
            codes, counts = np.unique(_colour_codes(arr), return_counts=True)
            self.colours.update({_rgb(int(c)): int(n) for c, n in zip(codes, counts, strict=True)})
        else:
            vals, counts = np.unique(arr, return_counts=True)
            self.values.update({int(v): int(n) for v, n in zip(vals, counts, strict=True)})


@dataclass
class LabelAdvice:
    """A diagnosis of masks that fail validation, and the config that would fix them.

    Attributes:
        problem: what the masks hold, in words.
        settings: config keys under ``data`` and their values (YAML flow values), in order.
        note: what to check before using the lines (guessed names, placeholders), or "".
    """

    problem: str
    settings: dict[str, str]
    note: str = ""

    def yaml(self) -> str:
        """The lines as a ``data:`` section of a YAML config."""
        return "data:\n" + "".join(f"  {k}: {v}\n" for k, v in self.settings.items())

    def overrides(self) -> list[str]:
        """The lines as command-line ``key=value`` overrides (quoted for a POSIX shell)."""
        return [f"'data.{k}={v}'" if any(c in v for c in " {}[]#\"") else f"data.{k}={v}"
                for k, v in self.settings.items()]  # fmt: skip

    def text(self) -> str:
        """The diagnosis and both forms of the fix, for a terminal or an error message."""
        lines = [self.problem]
        if self.settings:
            lines += ["Add to the config:", *("  " + line for line in self.yaml().splitlines())]
            lines += ["or on the command line:", "  " + " ".join(self.overrides())]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _flow_map(items: Iterable[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"


def _flow_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(items) + "]"


def advise(stats: MaskStats, classes: Sequence[str], ignore_index: int | None) -> LabelAdvice | None:
    """The config lines that would make these masks valid, or None when nothing is recognised.

    Recognised: only the values 0 and 255 (a binary mask); RGB colour-coded masks; ids at or above
    the number of classes (255 alone as the usual unlabelled value, or ids of a longer class list).
    """
    if stats.colours:
        return _advise_colours(stats, classes)
    if not stats.values:
        return None
    values = sorted(stats.values)
    n = len(classes)
    out = [v for v in values if v >= n and v != ignore_index]
    if not out:
        return None
    if len(values) == 2 and values[0] == 0 and out == [values[1]] and n <= 2:
        return _advise_binary(values[1], classes, stats.files)
    if out == [255] or out == [65535]:
        return LabelAdvice(
            f"the masks hold class ids {_ids_text(values)} with {n} classes in data.classes; {out[0]} "
            "usually marks unlabelled pixels",
            {"ignore_index": str(out[0])},
            note=f"If {out[0]} is a class instead, list it in data.classes or map it with data.label_map.",
        )
    return _advise_ids(values, out, classes)


def _ids_text(values: Sequence[int]) -> str:
    shown = ", ".join(map(str, values[:12]))
    return shown + (f", ... ({len(values)} values)" if len(values) > 12 else "")


def _advise_binary(high: int, classes: Sequence[str], files: int) -> LabelAdvice:
    names = list(classes) if len(classes) == 2 else ["background", "foreground"]
    settings = {} if len(classes) == 2 else {"classes": _flow_list(names)}
    settings["label_map"] = _flow_map([("0", names[0]), (str(high), names[1])])
    return LabelAdvice(
        f"the masks hold only the values 0 and {high} ({files} mask file(s) read): binary masks "
        f"stored as 0/{high}",
        settings,
    )


def _advise_ids(values: Sequence[int], out: Sequence[int], classes: Sequence[str]) -> LabelAdvice:
    n = len(classes)
    problem = (
        f"the masks hold ids {_ids_text(values)}, but data.classes has {n} names (ids 0..{n - 1}); "
        f"{_ids_text(out)} have no class"
    )
    if len(values) > 64:
        return LabelAdvice(problem, {}, note="List every class in data.classes (index = id).")
    names = [classes[v] if v < n else f"class_{v}" for v in values]
    settings = {"label_map": _flow_map((str(v), name) for v, name in zip(values, names, strict=True))}
    new = [name for name in names if name not in classes]
    if new:
        settings["classes"] = _flow_list([*classes, *new])
    return LabelAdvice(
        problem,
        settings,
        note="Replace the class_N placeholders with real names, drop ids that are not classes from "
        "data.label_map and list them in data.ignore_values (with data.ignore_index), or give "
        "data.classes one name per id instead.",
    )


def _advise_colours(stats: MaskStats, classes: Sequence[str]) -> LabelAdvice:
    colours = [c for c, _ in stats.colours.most_common()]
    problem = f"the masks are RGB colour-coded ({len(colours)} distinct colours in {stats.files} file(s))"
    if len(colours) > 64:
        return LabelAdvice(
            problem, {}, note="So many colours suggest images or JPEG-compressed masks in the seg folder."
        )
    by_lower = {c.lower(): c for c in classes}
    mapped: list[tuple[str, str]] = []
    ignore: list[str] = []
    guessed = placeholders = False
    for i, rgb in enumerate(colours):
        key = f'"{format_colour(rgb)}"'
        known = KNOWN_COLOURS.get(rgb)
        if rgb in VOID_COLOURS:
            ignore.append(key)
        elif known is not None and known.lower() in by_lower:
            mapped.append((key, by_lower[known.lower()]))
        elif known is not None:
            mapped.append((key, known))
            guessed = True
        else:
            mapped.append((key, f"class_{i}"))
            placeholders = True
    settings = {"label_map": _flow_map(mapped)}
    names = list(dict.fromkeys(v for _, v in mapped))
    if not set(names) <= set(classes):
        settings["classes"] = _flow_list([*classes, *(n for n in names if n not in classes)])
    if ignore:
        settings["ignore_values"] = _flow_list(ignore)
        settings["ignore_index"] = "255"
    notes = []
    if guessed:
        notes.append("Class names were guessed from the Cityscapes and CamVid palettes: check them.")
    if placeholders:
        notes.append("Replace the class_N placeholders with the class each colour stands for.")
    if ignore:
        notes.append("Black is taken as unlabelled (data.ignore_values); map it to a class if it is one.")
    return LabelAdvice(problem, settings, note=" ".join(notes))
