"""A character-level tokenizer for the embedded task, as a transformers PreTrainedTokenizerFast.

Built from a ``tokenizers`` BPE model with no merges (so every character is one token) and a
Fuse decoder (so decoding concatenates characters instead of joining them with spaces). It is
saved with every checkpoint and loads back with ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    # the library's default padding side: the rollouts ask for left padding in each call
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
