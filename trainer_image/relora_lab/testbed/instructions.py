"""The instruction-tuning corpus of the small ("instruct") update: the testbed's texts recast as
instruction / response pairs, the shape of the data a vendor's instruction-tuned v2 sees.

Each Bible verse and each Austen paragraph of at least ``MIN_WORDS`` words becomes a
"continue this text" instruction: the first half of its words is the input, the rest the
response. A pure function of the texts (no randomness): the update's distance from v1 comes from
its learning rate and steps, as for the other updates.
"""

from __future__ import annotations

MIN_WORDS = 8
TEMPLATE = "### Instruction: Continue the {kind}.\n### Input: {head}\n### Response: {tail}\n"


def instruction_text(bible: str, austen: str) -> str:
    """The Bible's verses and Austen's paragraphs as instructions, interleaved, one blank line
    between records."""
    records = []
    verses = _pieces(bible.splitlines(), "verse")
    paragraphs = _pieces(austen.split("\n\n"), "passage")
    for index in range(max(len(verses), len(paragraphs))):
        for pieces in (verses, paragraphs):
            if index < len(pieces):
                records.append(pieces[index])
    return "\n".join(records)


def _pieces(texts: list[str], kind: str) -> list[str]:
    result = []
    for text in texts:
        words = text.split()
        if len(words) < MIN_WORDS:
            continue
        cut = len(words) // 2
        result.append(
            TEMPLATE.format(kind=kind, head=" ".join(words[:cut]), tail=" ".join(words[cut:]))
        )
    return result
