"""Text -> token ids and masks, with colbert-ai's exact query and document conventions.

Mirrors colbert-ai 0.2.22 `colbert/modeling/tokenization/{query,doc}_tokenization.py`:
- a marker id ([unused0] for queries, [unused1] for documents: reused vocabulary ids) is inserted right
  after [CLS], so text is truncated to `maxlen - 3` tokens;
- queries are padded to `query_maxlen` and every [PAD] becomes [MASK] (query augmentation) with attention
  0, unless `attend_to_mask_tokens`;
- documents are padded to the longest document of the call;
- punctuation is not removed here: `DocTokenizer.keep_mask` gives the embedding mask the encoder applies.
PyLate 1.6 checkpoints (`TextSettings(pylate=True)`) differ in three ways, mirrored here: texts are stripped
(and lowercased when `do_lower_case`), the skiplist is `convert_tokens_to_ids` of its words, and every query
position is kept (its padding id is [MASK], so "not padding" would drop the expansion tokens).
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colbert_jax.config import ColBERTConfig

__all__ = ["QueryTokenizer", "DocTokenizer", "TextSettings", "load_hf_tokenizer", "check_texts"]


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """How texts become ids beyond `ColBERTConfig`: colbert-ai's conventions (default) or PyLate's."""

    pylate: bool = False
    lowercase: bool = False
    skiplist_words: tuple[str, ...] | None = None  # PyLate: looked up with convert_tokens_to_ids

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextSettings:
        words = d.get("skiplist_words")
        return cls(bool(d.get("pylate")), bool(d.get("lowercase")), None if words is None else tuple(words))


def load_hf_tokenizer(path: str | os.PathLike):
    """Loads a transformers fast tokenizer from a local directory."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast (Rust) tokenizer is required, got {type(tok).__name__}")
    for attr in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tok, attr) is None:
            raise ValueError(f"{path}: tokenizer has no {attr.removesuffix('_id')}, which ColBERT needs")
    return tok


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    """Validates a batch of texts: a non-empty list/tuple of str."""
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, got a single str; wrap it in a list")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{what} is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (e.g. JSON's "\ud800"): the tokenizer cannot take it
                raise ValueError(f"{what}[{i}] is not valid Unicode: lone surrogate at character {e.start}") from None
    return list(texts)


def _insert_marker(ids: np.ndarray, mask: np.ndarray, marker_id: int) -> tuple[np.ndarray, np.ndarray]:
    n = ids.shape[0]
    ids = np.concatenate([ids[:, :1], np.full((n, 1), marker_id, ids.dtype), ids[:, 1:]], axis=1)
    mask = np.concatenate([mask[:, :1], np.ones((n, 1), mask.dtype), mask[:, 1:]], axis=1)
    return ids, mask


def _pipeline_json(hf_tokenizer) -> str:
    """The Rust tokenizer's definition: the checkpoint's own `tokenizer.json` when there is one.

    transformers 4.x (which colbert-ai 0.2.22 and older PyLate run) loads that file as is; transformers 5
    rebuilds some pipelines from the vocabulary instead (XLM-RoBERTa gets a different normalizer and
    pre-tokenizer, which changes ids around whitespace), so the file is the faithful source.
    """
    path = Path(str(getattr(hf_tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return hf_tokenizer.backend_tokenizer.to_str()


def _backend(hf_tokenizer, max_length: int | None, pad_to: int | None | bool):
    """A private copy of the Rust tokenizer configured exactly as `hf_tokenizer(texts, truncation=...,
    padding=...)` configures it per call (transformers' `set_truncation_and_padding`). Calling it directly
    skips the Python wrapper's per-call overhead, and a fixed configuration is safe to share across threads
    (transformers reconfigures its shared backend on every call)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_pipeline_json(hf_tokenizer))
    tok.no_truncation()
    tok.no_padding()
    if max_length is not None:
        tok.enable_truncation(
            max_length=max_length, stride=0, strategy="longest_first", direction=hf_tokenizer.truncation_side
        )
    if pad_to is not False:
        kwargs = dict(
            pad_id=hf_tokenizer.pad_token_id,
            pad_token=hf_tokenizer.pad_token,
            pad_type_id=hf_tokenizer.pad_token_type_id,
            direction=hf_tokenizer.padding_side,
        )
        tok.enable_padding(length=pad_to, **kwargs) if pad_to else tok.enable_padding(**kwargs)
    return tok


class _Tokenizer:
    def __init__(self, hf_tokenizer, config: ColBERTConfig, text: TextSettings | None = None):
        self.hf = hf_tokenizer
        self.config = config
        self.text = text or TextSettings()
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.mask_id = int(hf_tokenizer.mask_token_id)
        # "[unusedN]" is not in every vocabulary; colbert-ai then silently uses [UNK]. We do the same, as
        # checkpoints trained that way depend on it.
        self.query_marker_id = int(hf_tokenizer.convert_tokens_to_ids(config.query_token_id))
        self.doc_marker_id = int(hf_tokenizer.convert_tokens_to_ids(config.doc_token_id))
        self._counter = _backend(hf_tokenizer, None, False)

    def _prepare(self, texts: list[str]) -> list[str]:
        if self.text.pylate:  # sentence-transformers' Transformer.tokenize
            texts = [t.strip() for t in texts]
        return [t.lower() for t in texts] if self.text.lowercase else texts

    @staticmethod
    def _encode(backend, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = backend.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return ids, mask

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens in each text, without special tokens and without truncation."""
        encodings = self._counter.encode_batch(self._prepare(list(texts)), add_special_tokens=False)
        return np.array([len(e.ids) for e in encodings])


class QueryTokenizer(_Tokenizer):
    """Queries -> `[CLS] [Q] tokens [SEP] [MASK]...` of exactly `query_maxlen` ids."""

    def __init__(self, hf_tokenizer, config: ColBERTConfig, text: TextSettings | None = None):
        super().__init__(hf_tokenizer, config, text)
        # padding="max_length", truncation=True, max_length=query_maxlen - 1 (room for the marker)
        self._backend = _backend(hf_tokenizer, config.query_maxlen - 1, config.query_maxlen - 1)

    def tensorize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(ids int32 [n, query_maxlen], attention_mask int32 [n, query_maxlen])`."""
        texts = self._prepare(check_texts(texts, "queries"))
        ids, mask = self._encode(self._backend, texts)
        ids, mask = _insert_marker(ids, mask, self.query_marker_id)
        ids[ids == self.pad_id] = self.mask_id
        if self.config.attend_to_mask_tokens:
            mask[ids == self.mask_id] = 1
        return ids, mask


class DocTokenizer(_Tokenizer):
    """Documents -> `[CLS] [D] tokens [SEP] [PAD]...`, padded to the longest document of the call."""

    def __init__(self, hf_tokenizer, config: ColBERTConfig, text: TextSettings | None = None):
        super().__init__(hf_tokenizer, config, text)
        if self.text.skiplist_words is not None:  # PyLate: vocabulary lookups (unknown words -> [UNK] id)
            skip = {int(hf_tokenizer.convert_tokens_to_ids(w)) for w in self.text.skiplist_words}
        else:  # colbert-ai keeps the first id of each punctuation character's encoding (colbert/modeling/colbert.py)
            skip = {self._counter.encode(ch, add_special_tokens=False).ids[0] for ch in string.punctuation}
        self.skiplist = np.array(sorted(skip) if config.mask_punctuation else [], dtype=np.int32)
        # padding="longest", truncation="longest_first", max_length=doc_maxlen - 1 (room for the marker)
        self._backend = _backend(hf_tokenizer, config.doc_maxlen - 1, None)

    def tensorize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(ids int32 [n, Ld], attention_mask int32 [n, Ld])` with `Ld <= doc_maxlen`."""
        texts = self._prepare(check_texts(texts, "documents"))
        return _insert_marker(*self._encode(self._backend, texts), self.doc_marker_id)

    def keep_mask(self, ids: np.ndarray) -> np.ndarray:
        """Which doc positions get an embedding: not padding, not a punctuation token."""
        return (ids != self.pad_id) & ~np.isin(ids, self.skiplist)
