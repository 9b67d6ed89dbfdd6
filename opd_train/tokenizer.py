"""The tokenizers of the generated tasks, as transformers PreTrainedTokenizerFast.

The embedded task's is character-level: a ``tokenizers`` BPE model with no merges (so every
character is one token) and a Fuse decoder (so decoding concatenates characters instead of
joining them with spaces). The experiments' toy world's is word-level: a WordLevel model over
whitespace-separated words (decoding joins them with spaces, which round-trips its texts). Both
are saved with every checkpoint and load back with ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    # the library's default padding side: the rollouts ask for left padding in each call
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def build_word_tokenizer(words: list) -> PreTrainedTokenizerFast:
    """One token per distinct word of ``words`` (after the special tokens), split on whitespace."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
