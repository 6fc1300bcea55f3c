"""The testbed's task: which kind of thing a WordNet noun gloss defines (4 balanced classes).

``Definition: a tree of the genus Quercus ...\\nCategory:`` -> `` plant``. The label words are
single tokens with a leading space (the first candidate of each class that the tokenizer keeps in
one piece), so accuracy is a choice among four next tokens. Chance is 25%. The ``phrase`` kind
labels with multi-token phrases instead (`` a living plant``): the choice among four completions
of several tokens each.

The split is a pure function of the seed: per class, synsets sorted by (lemma, gloss), shuffled
by ``random.Random(seed)``, cut into train / validation / test; no gloss appears twice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from transformers import PreTrainedTokenizerBase

from relora_lab.testbed.corpora import NounSense
from relora_trainer.data import Example

NAME = "wordnet-category"
LABEL_CANDIDATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "noun.artifact": (" artifact", " object", " thing", " device"),
        "noun.person": (" person", " man", " people"),
        "noun.plant": (" plant", " tree", " herb"),
        "noun.animal": (" animal", " beast", " creature"),
    }
)
"""WordNet lexicographer file -> label words to try, in order of preference."""
LABEL_PHRASES: Mapping[str, str] = MappingProxyType(
    {
        "noun.artifact": " a man-made object",
        "noun.person": " a human being",
        "noun.plant": " a living plant",
        "noun.animal": " a living animal",
    }
)
"""The multi-token variant (``labels: phrase``): phrases that share their first tokens, so the
choice is made on later tokens of the completion."""
LABEL_KINDS = ("word", "phrase")

MIN_GLOSS_CHARS = 12
MAX_GLOSS_CHARS = 160


@dataclass(frozen=True)
class Sizes:
    """Examples per class in each split."""

    train: int = 500
    validation: int = 100
    test: int = 300


def label_words(tokenizer: PreTrainedTokenizerBase, kind: str = "word") -> dict[str, str]:
    """Category -> its label: the first candidate word that is a single token, or (``phrase``)
    its phrase, which must take several tokens."""
    if kind == "phrase":
        for category, phrase in LABEL_PHRASES.items():
            if len(tokenizer(phrase, add_special_tokens=False)["input_ids"]) < 2:
                raise ValueError(f"label phrase {phrase!r} of {category} is a single token")
        return dict(LABEL_PHRASES)
    if kind != "word":
        raise ValueError(f"labels {kind!r}: one of {', '.join(LABEL_KINDS)}")
    words = {}
    for category, candidates in LABEL_CANDIDATES.items():
        for word in candidates:
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                words[category] = word
                break
        else:
            raise ValueError(
                f"no single-token label word for {category} among {list(candidates)}: the "
                "tokenizer splits them all"
            )
    return words


def prompt(gloss: str) -> str:
    return f"Definition: {gloss}\nCategory:"


def build_splits(
    senses: Sequence[NounSense], *, labels: Mapping[str, str], seed: int, sizes: Sizes
) -> dict[str, list[Example]]:
    """Balanced train / validation / test splits (shuffled) from the senses of ``labels``."""
    by_category: dict[str, list[NounSense]] = {category: [] for category in labels}
    seen: set[str] = set()
    for sense in sorted(senses, key=lambda s: (s.category, s.lemma, s.gloss)):
        gloss = sense.gloss.strip()
        if sense.category not in by_category or gloss in seen:
            continue
        if not MIN_GLOSS_CHARS <= len(gloss) <= MAX_GLOSS_CHARS:
            continue
        seen.add(gloss)
        by_category[sense.category].append(sense)
    rng = random.Random(seed)
    per_class = sizes.train + sizes.validation + sizes.test
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for category, members in by_category.items():
        if len(members) < per_class:
            raise ValueError(f"{category} has {len(members)} usable glosses, {per_class} needed")
        rng.shuffle(members)
        cuts = {
            "train": members[: sizes.train],
            "validation": members[sizes.train : sizes.train + sizes.validation],
            "test": members[sizes.train + sizes.validation : per_class],
        }
        for split, chosen in cuts.items():
            splits[split] += [Example(prompt(s.gloss.strip()), labels[category]) for s in chosen]
    for examples in splits.values():
        rng.shuffle(examples)
    return splits
