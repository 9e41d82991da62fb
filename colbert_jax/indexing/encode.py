"""Passage encoding for indexes, independent of which other passages share a batch.

`ColBERTModel.iter_doc_batches` pads each batch to its longest passage and its row count to a power of two,
so a passage's embeddings depend (in the last bits, often enough to flip a float16 rounding) on the shapes
its neighbours imply: measured on the tiny test model, 4 to 12 of 37 passages re-encoded inside another
subset of the same collection came out different. An index that grows by `Indexer.add` must encode a new
passage exactly as a rebuild over the final collection would, so indexes encode in canonical batches: a
passage goes to the batch of its own padded length (a multiple of `LENGTH_BUCKET`), and every batch of that
length has the same number of rows (padding rows are zeros). With the shape fixed, each row is computed by
the same program whatever its neighbours hold, so a passage's embeddings depend on its text alone (for a
given checkpoint and device count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from colbert_jax.model import LENGTH_BUCKET, ColBERTModel

__all__ = ["encode_passages", "batch_rows"]


def batch_rows(model: ColBERTModel, width: int) -> int:
    """Rows of every canonical batch of passages padded to `width` tokens (the model's token budget)."""
    budget = model.tokens_per_batch * model.n_devices // width
    rows = max(model.n_devices, min(model.config.index_bsize, 1 << max(0, int(budget).bit_length() - 1)))
    return -(-rows // model.n_devices) * model.n_devices


def encode_passages(
    model: ColBERTModel, texts: Sequence[str], progress: Callable[[int], None] | None = None
) -> list[np.ndarray]:
    """Passages -> one float32 [doclen_i, dim] array each (punctuation and padding dropped), in input order.

    Each passage's embeddings are bit-identical whichever other passages are encoded with it.
    `progress(n)` is called as batches finish.
    """
    if len(texts) == 0:
        return []
    ids, mask = model.doc_tokenizer.tensorize(texts)
    lengths = mask.sum(axis=1)
    widths = -(-lengths // LENGTH_BUCKET) * LENGTH_BUCKET
    out: list[np.ndarray | None] = [None] * len(texts)

    def batches():
        for width in sorted({int(w) for w in widths}, reverse=True):
            members = np.flatnonzero(widths == width)
            rows = batch_rows(model, width)
            for start in range(0, len(members), rows):
                idx = members[start : start + rows]
                bid = np.zeros((rows, width), ids.dtype)
                bmask = np.zeros((rows, width), mask.dtype)
                cols = min(width, ids.shape[1])
                bid[: len(idx), :cols] = ids[idx, :cols]
                bmask[: len(idx), :cols] = mask[idx, :cols]
                yield idx, model._doc_fn(model.params, bid, bmask, model._skiplist)

    for idx, (d, keep) in model._pipeline(batches()):
        for j, row in enumerate(idx):
            out[row] = np.asarray(d[j][keep[j]], np.float32)
        if progress is not None:
            progress(len(idx))
    return out
