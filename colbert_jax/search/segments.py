"""Variable-length segments (a passage's embedding rows, a cluster's rows, an IVF list) laid out as packed
slots with static shapes: all at once into a bucketed number of slots (`expand`), or a fixed chunk of slots at
a time for as many chunks as the data needs (`stream`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["expand", "stream", "segment_max"]


def expand(lengths: jax.Array, starts: jax.Array, total: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Packed expansion of variable-length segments into `total` slots.

    Returns (segment id per slot, position in the source per slot, valid mask per slot).
    """
    seg = jnp.repeat(jnp.arange(lengths.shape[0]), lengths, total_repeat_length=total)
    first = jnp.cumsum(lengths) - lengths
    slot = jnp.arange(total)
    valid = slot < lengths.sum()
    return seg, starts[seg] + slot - first[seg], valid


def stream(lengths: jax.Array, starts: jax.Array, chunk: int, init, body: Callable):
    """Runs `body(carry, seg, src, valid)` over the packed slots of variable-length segments, `chunk` slots
    at a time, for as many chunks as the actual total needs (a dynamic trip count: no padding to a bucket).
    Segments are visited in order, so `seg` is sorted within every chunk."""
    ends = jnp.cumsum(lengths)
    first = ends - lengths
    total = ends[-1]

    def step(i, carry):
        lo = i * chunk
        slot = lo + jnp.arange(chunk)
        # The segment of each slot: one binary search for the chunk's first slot, then a +1 at every later
        # segment start (empty segments stack) and a running sum: half the cost of a search per slot.
        inside = (first > lo) & (first < lo + chunk)
        starts_here = jnp.zeros(chunk, jnp.int32).at[jnp.where(inside, first - lo, chunk)].add(1, mode="drop")
        seg = jnp.searchsorted(ends, lo, side="right") + jnp.cumsum(starts_here)
        seg = jnp.minimum(seg, lengths.shape[0] - 1)
        return body(carry, seg, starts[seg] + slot - first[seg], slot < total)

    return jax.lax.fori_loop(0, (total + chunk - 1) // chunk, step, init)


def segment_max(values: jax.Array, seg: jax.Array, num_segments: int) -> jax.Array:
    """The maximum of `values` rows per (sorted) segment id."""
    return jax.ops.segment_max(values, seg, num_segments=num_segments, indices_are_sorted=True)
