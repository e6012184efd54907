"""SentencePiece tokenizer wrapper (stand-in for ``gemma.tokenizer``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece


class Tokenizer:
    def __init__(self, model_path: str | None) -> None:
        assert model_path is not None and os.path.isfile(model_path), model_path
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Converts a string into a list of token ids."""
        assert isinstance(s, str)
        ids: list[int] = list(self.sp_model.encode(s))
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Converts a list of token ids into a string."""
        return self.sp_model.decode(list(ids))
