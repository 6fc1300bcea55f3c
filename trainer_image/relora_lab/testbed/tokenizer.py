"""A byte-level BPE tokenizer trained on the testbed's corpora (seconds, deterministic).

Byte-level: every string encodes, nothing is ever unknown. Three special tokens: ``<pad>``,
``<s>`` (prepended to task prompts by the Encoder) and ``</s>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHUNK_CHARS = 100_000


def _chunks(texts: Sequence[str]) -> Iterator[str]:
    for text in texts:
        for start in range(0, len(text), CHUNK_CHARS):
            yield text[start : start + CHUNK_CHARS]


def train_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (specials included) learnt from ``texts``."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_chunks(texts), trainer)
    return wrap(core)


def wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a ``tokenizers`` core with the testbed's specials."""
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None
    )
