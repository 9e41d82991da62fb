"""The device arrays of an index for PLAID search (`IndexArrays`) and how a stage runs over them: once per
shard of the `shard` mesh axis (`run_sharded`), once per query inside a shard (`map_queries`).

Per-shard fields have a leading shard axis, split over the mesh; inside `run_sharded` a stage sees its
shard's slice (`IndexArrays.local`). Passage positions inside a shard are local: add `first` for the global
position. Every shard's passages end with one sentinel position (`sentinel`), whose doclen is 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

__all__ = ["AXIS", "NEG_INF", "ShardedArrays", "IndexArrays", "run_sharded", "map_queries", "if_real", "pow2", "bucket"]

AXIS = "shard"
NEG_INF = -jnp.inf


class ShardedArrays:
    """Methods of an engine's device arrays (a frozen, registered dataclass): the codec's `centroids` and
    `bucket_weights` are replicated, every other array field has a leading shard axis; fields marked static
    are sizes, not arrays."""

    def fields(self) -> list[tuple[str, jax.Array | None]]:
        """(name, value) of every array field, None ones included."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("static")]

    def specs(self):
        """The partition specs of the fields (`shard_map`'s in_specs), None where a field is None."""
        return dataclasses.replace(
            self,
            **{name: P() if name in _REPLICATED else P(AXIS) for name, value in self.fields() if value is not None},
        )

    def local(self):
        """Inside `shard_map`: drop the (size 1) shard axis of the per-shard fields."""
        return dataclasses.replace(
            self, **{name: value[0] for name, value in self.fields() if value is not None and name not in _REPLICATED}
        )


_REPLICATED = (
    "centroids",
    "bucket_weights",
    "centroids_split",
    "centroids_blocked",
    "centroids_bf16",
    "centroids_int8",
    "centroids_int8_terms",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexArrays(ShardedArrays):
    """An index's arrays on the devices (`placement.place_index`). Optional fields are None where the reader
    does not need them: a memory-mapped index leaves residuals on disk, the mmap streamed path reads the IVF
    lists from disk, `allowed` is set only for a filtered search, `centroids_split` only on CPUs with AMX-BF16 and
    `centroids_blocked` only on other CPUs whose float32 stage 1 kernel is faster than XLA's product, and
    `centroids_bf16` or `centroids_int8` (instead of either) where stage 1 runs on bfloat16 or int8 operands
    (`placement.stage1_precision`)."""

    centroids: jax.Array  # f32 [P, dim] (replicated)
    bucket_weights: jax.Array  # f32 [2^nbits] (replicated)
    codes: jax.Array  # i32 (or u16) [D, E + 1] (last: a padding row, code P)
    doclens: jax.Array  # i32 [D, N + 1] (0 past the shard's passages)
    offsets: jax.Array  # i32 [D, N + 1]: first row of each passage
    first: jax.Array  # i32 [D]: global position of the shard's first passage
    count: jax.Array  # i32 [D]: the shard's passages
    ivf_lengths: jax.Array | None = None  # i32 [D, P + 1] (last: 0)
    residuals: jax.Array | None = None  # u8 [D, E + 1, dim * nbits / 8]
    inv_norms: jax.Array | None = None  # f32 [D, E + 1]: 1 / ||centroid + residual|| of each row
    ivf: jax.Array | None = None  # i32 [D, I]: local passage positions, list after list
    ivf_offsets: jax.Array | None = None  # i32 [D, P + 1]
    allowed: jax.Array | None = None  # bool [D, N + 1]: a search filter, the passages that may be candidates
    # bf16 [2, Pp, Kp] (replicated): the centroids' two bfloat16 terms, where the centroid scores are computed
    # on the CPU's tile unit (`candidates.centroid_scores`); None: by an XLA float32 product
    centroids_split: jax.Array | None = None
    # f32 [ceil(P / 8), dim, 8] (replicated): the centroids in groups of 8 (`native.block_centroids`), where the
    # centroid scores are a native float32 product (`candidates.centroid_scores`, CPUs without AMX-BF16)
    centroids_blocked: jax.Array | None = None
    # bf16 [ceil(P / 8), ceil(dim / 2), 8, 2] (replicated): the centroids rounded to bfloat16 and packed
    # (`native.block_centroids_bf16`), where stage 1 is a product of bfloat16 operands with float32 sums
    # (`candidates.centroid_scores`; `placement.stage1_precision`)
    centroids_bf16: jax.Array | None = None
    # i8 [ceil(P / 8), ceil(dim / 4), 8, 4] and f32 [ceil(P / 8) * 8, 2] (replicated): the centroids quantized
    # to int8 and packed, and their scales and offset corrections (`native.block_centroids_int8`), where stage 1
    # is a product of int8 operands (`placement.stage1_precision`)
    centroids_int8: jax.Array | None = None
    centroids_int8_terms: jax.Array | None = None

    @property
    def approximate_scores(self) -> bool:
        """Whether stage 1's S comes from bfloat16 or int8 operands: stage 6 then recomputes q . c in float32."""
        return self.centroids_bf16 is not None or self.centroids_int8 is not None

    @property
    def scores_dtype(self) -> Any:
        """The dtype of stage 1's S (`candidates.centroid_scores`): float16 from int8 operands (half the bytes,
        far inside int8's error), float32 otherwise. Readers that sum or compare scores take them as float32."""
        others = (self.centroids_split, self.centroids_blocked, self.centroids_bf16)
        int8 = self.centroids_int8 is not None and all(x is None for x in others)
        return jnp.float16 if int8 else jnp.float32

    @property
    def sentinel(self) -> int:
        """The (local) sentinel position: one past a shard's last passage slot."""
        return self.doclens.shape[-1] - 1

    @property
    def padding_row(self) -> int:
        """The last row of `codes` (and `residuals`): padding, never part of a passage."""
        return self.codes.shape[-1] - 1

    def filtered(self, allowed: jax.Array | None) -> IndexArrays:
        """These arrays with the search filter `allowed` (None: none)."""
        return self if allowed is None else dataclasses.replace(self, allowed=allowed)


def run_sharded(
    fn: Callable, mesh: Mesh, args: Sequence, arrays: IndexArrays, in_specs: Sequence, out_specs
) -> jax.Array | tuple:
    """`fn(*args, local arrays)` on every shard of `mesh` (`shard_map`), `args` split by `in_specs`."""

    def shard(*xs):
        *xs, a = xs
        return fn(*xs, a.local())

    return jax.shard_map(shard, mesh=mesh, in_specs=(*in_specs, arrays.specs()), out_specs=out_specs, check_vma=False)(
        *args, arrays
    )


def map_queries(fn: Callable, xs, query_chunk: int):
    """vmap over queries, or a sequential map over chunks of `query_chunk` queries. On CPU, one query at a
    time is several times faster (XLA:CPU lowers batched gathers poorly); elsewhere chunks bound memory."""
    batch = jax.tree.leaves(xs)[0].shape[0]
    if 0 < query_chunk < batch:
        return jax.lax.map(fn, xs, batch_size=query_chunk)
    return jax.vmap(fn)(xs)


def if_real(real: jax.Array, run: Callable, skipped, *operands):
    """`run(*operands)` for a real query, `skipped` (arrays of the same shapes) for a padding one: a padding
    query of a batch bucket costs nothing."""
    return jax.lax.cond(real, run, lambda *_: skipped, *operands)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): a static size that compiles few programs."""
    return 1 << max(0, int(n - 1).bit_length())


def bucket(n: int) -> int:
    """Round up to a quarter-octave step (8, 10, 12, 14, 16, 20, ...): few distinct compiled shapes, <= 25%
    padding."""
    n = max(int(n), 1)
    if n <= 8:
        return pow2(n)
    step = pow2(n) // 8
    return -(-n // step) * step
