"""`ColBERTModel`: tokenizers + Flax encoder + params, with jitted, bucketed, data-parallel encoding.

Shapes are padded to buckets so `jit` compiles a bounded number of programs: sequence lengths round up to
multiples of `LENGTH_BUCKET` (queries are always `query_maxlen`), batch sizes to powers of two (and to a
multiple of the device count). Padding is exact: padded keys get an additive mask of finfo.min, so their
attention weight is exactly zero, and padded rows are dropped.

Batches hold up to `tokens_per_batch` tokens per device (rows = budget // padded length, a power of
two): on CPU about 1k tokens keeps the working set in cache and runs up to 2x faster than 64 x 180
(measured: 215 vs 110 passages/s on 2 cores); accelerators get a large budget. Every batch is split
over all local devices along a `data` mesh axis (params replicated): one code path for 1..N devices.
Batches are dispatched one ahead of the host so tokenised input and results overlap with compute.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colbert_jax import native
from colbert_jax.config import ColBERTConfig
from colbert_jax.modeling.backbones import BackboneConfig, supports_unstacked, unstacked_params
from colbert_jax.modeling.colbert import ColBERTEncoder, embed_docs, embed_queries
from colbert_jax.modeling.invariant import batch_invariant
from colbert_jax.modeling.quantize import fuse_float_params, quantize_params, quantized_apply
from colbert_jax.tokenization import DocTokenizer, QueryTokenizer, TextSettings

__all__ = ["ColBERTModel", "LENGTH_BUCKET"]

LENGTH_BUCKET = 16
CPU_TOKENS_PER_BATCH = 1024
ACCELERATOR_TOKENS_PER_BATCH = 1 << 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Query batches past this many rows pad to a multiple of it, not to a power of two: a batch of 33-64 queries
# costs the encoder (and search) for 48 or 64 rows, not always 64 (an arbitrary query count's last batch).
QUERY_BATCH_STEP = 16


def batch_bucket(n: int, bsize: int, n_devices: int, step: int | None = None) -> int:
    """Smallest power of two >= n, or past `step` (a power of two) the smallest multiple of `step` >= n,
    capped at bsize and rounded up to a multiple of the device count: few compiled batch shapes."""
    b = 1 << max(0, (n - 1).bit_length())
    if step is not None and b > step:
        b = _round_up(n, step)
    return _round_up(max(min(b, bsize), n), n_devices)


def batch_buckets(bsize: int, step: int | None = None) -> list[int]:
    """Every size `batch_bucket` gives for 1..bsize rows on one device."""
    return sorted({batch_bucket(n, bsize, 1, step) for n in range(1, bsize + 1)})


class ColBERTModel:
    """A loaded ColBERT checkpoint: `encode_queries`, `encode_docs`, `save`.

    Build one with `colbert_jax.load_checkpoint(path_or_name)`.
    """

    def __init__(
        self,
        config: ColBERTConfig,
        bert_config: BackboneConfig,
        params,
        hf_tokenizer,
        *,
        extras: dict[str, np.ndarray] | None = None,
        tokenizer_files: dict[str, bytes] | None = None,
        devices: Sequence[jax.Device] | None = None,
        tokens_per_batch: int | None = None,
        head: tuple[tuple[int, bool, str], ...] = (),
        text: TextSettings | None = None,
    ):
        self.config = config
        self.head = tuple(head)
        self.text = text or TextSettings()
        self.bert_config = bert_config
        self.hf_tokenizer = hf_tokenizer
        self.extras = dict(extras or {})
        self.tokenizer_files = dict(tokenizer_files or {})
        self.query_tokenizer = QueryTokenizer(hf_tokenizer, config, self.text)
        self.doc_tokenizer = DocTokenizer(hf_tokenizer, config, self.text)
        dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
        self.module = ColBERTEncoder(bert_config, config.dim, dtype=dtype, head=self.head)

        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        self.n_devices = self.mesh.size
        if tokens_per_batch is None:
            cpu = self.mesh.devices.flat[0].platform == "cpu"
            tokens_per_batch = CPU_TOKENS_PER_BATCH if cpu else ACCELERATOR_TOKENS_PER_BATCH
        self.tokens_per_batch = tokens_per_batch
        replicated = NamedSharding(self.mesh, P())
        rows = NamedSharding(self.mesh, P("data"))
        self._rows = rows
        self.params = jax.device_put(params, replicated)
        self._skiplist = jax.device_put(self.doc_tokenizer.skiplist, replicated)
        pad_id = self.doc_tokenizer.pad_id
        # PyLate pads queries with [MASK] and keeps every position: no id is "padding" there.
        self.query_pad_id = -1 if self.text.pylate else pad_id
        cpu = self.mesh.devices.flat[0].platform == "cpu"
        # On CPU the query encoder runs one module per layer: a scanned layer copies its weights out of the
        # stack on every call (`bert._Encoder`), which costs more than one query's products.
        query_params = params
        query_module = self.module
        if cpu and supports_unstacked(bert_config):
            query_params = unstacked_params(bert_config, jax.device_get(params))
            query_module = self.module.clone(unstacked=True)
        query_fn = functools.partial(embed_queries, query_module, pad_id=self.query_pad_id)
        self._query_params = self.params if query_params is params else jax.device_put(query_params, replicated)
        # "auto": the fastest of the encoders that keep query embeddings within cosine 1e-3 of float32's and
        # rankings' overlap@10 at 0.99, by this CPU's measured rates (`native.query_products_by_speed`): the
        # two-term int8 encoder where its products run on AMX tiles, or on AVX-512 VNNI well above float32's rate
        # (three int8 products per weight); the float32 encoder with its dense products on int16 operands
        # (`native.dense_int16`, one `vpdpwssd` multiply-add per weight and the activations' quantization); not the
        # bfloat16 ones, whose rankings fall under the bar on the bench queries. XLA's own int8 products are no
        # faster per operation than float32's, and accelerators' float32 (or bfloat16) matmuls are fast already. int8
        # only where its embeddings do not depend on the batch size (`int8_batch_invariant`: not ModernBERT's yet).
        float_native = (
            cpu
            and config.compute_dtype == "float32"
            and query_module is not self.module
            and native.enabled()
            and native.dense_f32_vectorized()
        )
        self.query_quantization = config.query_quantization
        if self.query_quantization == "auto":
            runs = {
                "int8": cpu and bert_config.int8_batch_invariant,
                "int16": float_native,
                "none": True,
            }
            fastest = native.query_products_by_speed() if cpu else ["none"]
            self.query_quantization = next(q for q in fastest if runs[q])
        if self.query_quantization in ("bf16", "int16") and not float_native:
            raise ValueError(
                f'query_quantization="{self.query_quantization}" runs the float32 query encoder\'s native CPU kernels: '
                "it needs CPU devices, compute_dtype float32, a BERT-family backbone and the native kernels "
                '(colbert_jax.native.enabled()) built for AVX2 or AVX-512; use "none" or "auto" here'
            )
        # each int8 dense layer runs as one native kernel (`native.int8_dense`) on the tile unit where the CPU has
        # AMX-INT8, else on the vector unit's int8 products where the kernels are built with AVX-512 VNNI
        self.int8_products = "xla"
        if self.query_quantization == "int8" and cpu:
            if native.amx_available():
                self.int8_products = "amx"
            elif native.int8_vnni_available():
                self.int8_products = "vnni"
        if self.query_quantization == "int8":
            packed = self.int8_products != "xla"
            self._query_params = jax.device_put(quantize_params(query_params, packed=packed), replicated)
            # int8 rounds each dense layer's input rows: the float ops between run at large-batch shapes so that
            # a query's embedding does not depend on the batch it is encoded in
            implementation = self.int8_products if packed else "amx"  # (unpacked params: XLA's products)
            query_fn = quantized_apply(batch_invariant(query_fn, self.n_devices), implementation)
        # float32 on AVX-512 and AVX2 CPUs, BERT-family backbones (their per-layer modules): attention on the
        # fused projections as a native kernel (and the intermediate GELU on AVX-512), and a few queries' products
        # too (split across threads: XLA:CPU runs a query's small products on one core); float32-accurate, not
        # XLA's bits. Elsewhere the kernels' scalar paths would be slower than XLA's: XLA runs it all there.
        # "bf16" is this encoder with every dense product on bfloat16 operands. Rounding each product's input rows
        # to bfloat16 turns last-bit float32 differences into whole-step flips, as int8 does: the float ops
        # between run at large-batch shapes there too, so that a query's embedding does not depend on its batch.
        # "int16" likewise on int16 operands (`native.dense_int16`), each row and weight column with its own scale.
        self.native_float_encoder = self.query_quantization in ("none", "bf16", "int16") and float_native
        if self.native_float_encoder:
            bf16, int16 = self.query_quantization == "bf16", self.query_quantization == "int16"
            fused = fuse_float_params(query_params, packed=True, bf16=bf16, int16=int16)
            self._query_params = jax.device_put(fused, replicated)
            rounds = bf16 or int16
            query_fn = quantized_apply(batch_invariant(query_fn, self.n_devices) if rounds else query_fn)
        self._query_fn = jax.jit(query_fn, in_shardings=(replicated, rows, rows), out_shardings=rows)
        self._doc_fn = jax.jit(
            functools.partial(embed_docs, self.module, pad_id=pad_id),
            in_shardings=(replicated, rows, rows, replicated),
            out_shardings=(rows, rows),
        )

    def __repr__(self) -> str:
        c, b = self.config, self.bert_config
        return (
            f"ColBERTModel(checkpoint={c.checkpoint!r}, layers={b.num_hidden_layers}, hidden={b.hidden_size}, "
            f"dim={c.dim}, query_maxlen={c.query_maxlen}, doc_maxlen={c.doc_maxlen}, devices={self.n_devices})"
        )

    # -- queries ------------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str], *, bsize: int = 128) -> np.ndarray:
        """Encodes queries -> float32 [n, query_maxlen, dim], L2-normalised ([MASK] rows included)."""
        ids, mask = self.query_tokenizer.tensorize(texts)
        return self.encode_query_ids(ids, mask, bsize=bsize)

    def encode_query_ids(self, ids: np.ndarray, mask: np.ndarray, *, bsize: int = 128) -> np.ndarray:
        out = np.empty((ids.shape[0], ids.shape[1], self.config.dim), np.float32)
        for (start, stop), q in self._pipeline(self._query_batches(ids, mask, bsize)):
            out[start:stop] = q[: stop - start]
        return out

    def _query_batches(self, ids, mask, bsize):
        budget = self.tokens_per_batch * self.n_devices // ids.shape[1]
        bsize = max(self.n_devices, min(bsize, 1 << max(0, budget.bit_length() - 1)))
        for start in range(0, len(ids), bsize):
            stop = min(start + bsize, len(ids))
            b = batch_bucket(stop - start, bsize, self.n_devices, QUERY_BATCH_STEP)
            # placed explicitly: in a multi-process runtime jit refuses numpy inputs with a split sharding
            batch = jax.device_put((_pad_rows(ids[start:stop], b), _pad_rows(mask[start:stop], b)), self._rows)
            yield (start, stop), self._query_fn(self._query_params, *batch)

    # -- documents ----------------------------------------------------------------------------------
    def encode_docs(self, texts: Sequence[str], *, bsize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encodes documents -> (float32 [n, Ld, dim], bool mask [n, Ld]); Ld = longest document.

        Masked positions (padding, punctuation) are zero vectors, as in the reference's `keep_dims=True`.
        """
        ids, mask = self.doc_tokenizer.tensorize(texts)
        n, width = ids.shape
        out = np.zeros((n, width, self.config.dim), np.float32)
        keep = np.zeros((n, width), bool)
        for idx, d, k in self.iter_doc_batches(ids, mask, bsize=bsize):
            out[idx, : d.shape[1]] = d[:, :width]
            keep[idx, : k.shape[1]] = k[:, :width]
        return out, keep

    def encode_docs_flat(self, texts: Sequence[str], *, bsize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encodes documents -> (float32 [sum(doclens), dim], int64 doclens [n]).

        Rows are the kept token vectors, passage by passage in input order, token order within a passage
        (colbert-ai's `docFromText(keep_dims="flatten")`).
        """
        ids, mask = self.doc_tokenizer.tensorize(texts)
        per_doc: list[np.ndarray | None] = [None] * len(ids)
        for idx, d, k in self.iter_doc_batches(ids, mask, bsize=bsize):
            for j, row in enumerate(idx):
                per_doc[row] = d[j][k[j]]
        doclens = np.array([len(x) for x in per_doc], np.int64)
        return np.concatenate(per_doc).astype(np.float32, copy=False), doclens

    def iter_doc_batches(
        self, ids: np.ndarray, mask: np.ndarray, *, bsize: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Encodes tokenised documents in length-sorted batches.

        Yields `(row indices into ids, float32 [b, Lb, dim], bool keep [b, Lb])` per batch, in an
        order sorted by length; callers scatter rows back by index.
        """
        bsize = bsize or self.config.index_bsize
        lengths = mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable")

        def batches():
            start = 0
            while start < len(order):
                width = _round_up(int(lengths[order[start]]), LENGTH_BUCKET)  # longest of the batch comes first
                budget = self.tokens_per_batch * self.n_devices // width
                rows = max(self.n_devices, min(bsize, 1 << max(0, budget.bit_length() - 1)))
                idx = order[start : start + rows]
                start += len(idx)
                b = batch_bucket(len(idx), rows, self.n_devices)
                bid = _pad_rows(_pad_cols(ids[idx], width), b)
                bmask = _pad_rows(_pad_cols(mask[idx], width), b)
                yield idx, self._doc_fn(self.params, bid, bmask, self._skiplist)

        for idx, (d, k) in self._pipeline(batches()):
            yield idx, d[: len(idx)], k[: len(idx)]

    # -- shared -------------------------------------------------------------------------------------
    @staticmethod
    def _pipeline(dispatched):
        """Keeps one batch in flight on the device while the previous one is copied to the host."""
        pending = None
        for key, result in dispatched:
            if pending is not None:
                yield pending[0], jax.device_get(pending[1])
            pending = (key, result)
        if pending is not None:
            yield pending[0], jax.device_get(pending[1])

    def save(self, directory: str | os.PathLike, *, format: str = "torch", overwrite: bool = False):
        """Writes a checkpoint directory: the PyTorch ColBERTv2 layout by default (`format="jax"`: ours).

        See `colbert_jax.checkpoint.save_checkpoint`.
        """
        from colbert_jax.checkpoint import save_checkpoint

        return save_checkpoint(self, directory, format=format, overwrite=overwrite)

    def replace_config(self, **overrides) -> ColBERTModel:
        """A model sharing these params with config overrides (e.g. `compute_dtype="bfloat16"`)."""
        return ColBERTModel(
            self.config.replace(**overrides),
            self.bert_config,
            self.params,
            self.hf_tokenizer,
            extras=self.extras,
            tokenizer_files=self.tokenizer_files,
            devices=list(self.mesh.devices.flat),
            tokens_per_batch=self.tokens_per_batch,
            head=self.head,
            text=self.text,
        )


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def _pad_cols(x: np.ndarray, cols: int) -> np.ndarray:
    if x.shape[1] >= cols:
        return x[:, :cols]
    return np.pad(x, ((0, 0), (0, cols - x.shape[1])))
