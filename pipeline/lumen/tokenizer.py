"""A word-level tokenizer for the tiny base model, built from the dataset's captions (nothing downloaded).

It is a stock ``transformers.PreTrainedTokenizerFast`` (WordLevel model, lower-casing, whitespace and
punctuation splitting, ``[BOS] ... [EOS]`` template), so it saves with ``save_pretrained`` and loads in
the stock ``StableDiffusionPipeline``. Words outside the vocabulary map to ``[UNK]``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

__all__ = ["BASE_WORDS", "SPECIAL_TOKENS", "build_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# General words for prompts beyond the captions (variation prompts: colours, light, weather, styles).
BASE_WORDS = [
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "in",
    "on",
    "at",
    "with",
    "without",
    "by",
    "from",
    "to",
    "under",
    "over",
    "near",
    "behind",
    "in",
    "front",
    ",",
    ".",
    "red",
    "orange",
    "yellow",
    "green",
    "teal",
    "blue",
    "purple",
    "pink",
    "white",
    "black",
    "grey",
    "gray",
    "brown",
    "gold",
    "silver",
    "cream",
    "mint",
    "lavender",
    "peach",
    "pale",
    "sky",
    "bright",
    "dark",
    "dim",
    "soft",
    "warm",
    "cold",
    "low",
    "high",
    "evening",
    "morning",
    "midday",
    "night",
    "sunset",
    "sunrise",
    "daylight",
    "moonlight",
    "light",
    "shadow",
    "rain",
    "rainy",
    "snow",
    "snowy",
    "fog",
    "foggy",
    "winter",
    "summer",
    "autumn",
    "spring",
    "cloudy",
    "sunny",
    "overcast",
    "wet",
    "dry",
    "street",
    "road",
    "city",
    "car",
    "cars",
    "building",
    "buildings",
    "tree",
    "trees",
    "sidewalk",
    "pavement",
    "pedestrian",
    "people",
    "sign",
    "pole",
    "fence",
    "scene",
    "photo",
    "photograph",
    "photographed",
    "painting",
    "cartoon",
    "style",
    "realistic",
    "colourful",
    "colorful",
    "vivid",
    "muted",
    "pastel",
    "floor",
    "wall",
    "walls",
    "room",
    "sphere",
    "box",
    "cube",
    "cylinder",
    "ball",
    "object",
    "objects",
]

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_tokenizer(
    captions: Iterable[str], max_length: int = 48, min_count: int = 1
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`BASE_WORDS` plus every word seen ``min_count`` times in ``captions``.

    Token ids are deterministic: special tokens first, then words sorted alphabetically.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    counts = Counter(w for c in captions for w in _words(c))
    words = sorted(set(BASE_WORDS) | {w for w, n in counts.items() if n >= min_count})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )
