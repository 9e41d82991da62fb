"""Every kernel lowers for CUDA (Pallas -> Triton IR) at every shape `ColBERTConfig` allows, sampled on a
grid with non-powers of two: dims 48/64/96/128, document lengths 1/24/100/180/300, query lengths 24/32/64,
nbits 1/2/4 (8 for decompression), 1, 7 and 64 documents. Run on CPU: this proves the shapes, block sizes
and APIs that Triton accepts, not the compilation to machine code (that happens on the GPU)."""

import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from tests.kernels.lowering import assert_triton_kernel, lower

f32, u8, i32 = jnp.float32, jnp.uint8, jnp.int32
S = jax.ShapeDtypeStruct

DIMS = [48, 64, 96, 128]
DOC_LENGTHS = [1, 24, 100, 180, 300]
QUERIES = [(24, 1), (32, 7), (64, 64)]  # (query length, number of documents)


@functools.cache
def _maxsim(nbits):
    return jax.jit(functools.partial(pallas_kernels.maxsim, nbits=nbits, implementation="pallas"))


@functools.cache
def _decompress(nbits):
    return jax.jit(functools.partial(pallas_kernels.decompress, nbits=nbits, implementation="pallas"))


_interaction = jax.jit(functools.partial(pallas_kernels.centroid_interaction, implementation="pallas"))


# Every (dim, document length, nbits) with one of the (query length, documents) pairs, rotated so that each
# pair meets every dim, length and nbits: the full product would triple the time for no new block logic.
MAXSIM_GRID = [
    (dim, L, nbits, *QUERIES[(i + j + k) % len(QUERIES)])
    for i, dim in enumerate(DIMS)
    for j, L in enumerate(DOC_LENGTHS)
    for k, nbits in enumerate([1, 2, 4])
]


@pytest.mark.parametrize("dim,L,nbits,lq,n", MAXSIM_GRID)
def test_maxsim_lowers_for_cuda(dim, L, nbits, lq, n):
    packed = S((n, L, dim * nbits // 8), u8)
    args = (S((lq, dim), f32), S((n, L, dim), f32), packed, S((1 << nbits,), f32), S((n,), i32))
    text = lower(_maxsim(nbits), *args, platform="cuda", name=f"maxsim(nbits={nbits})")
    assert_triton_kernel(text, "colbert_maxsim")


@pytest.mark.parametrize("rows", [1, 7, 100, 300, 64 * 180])
@pytest.mark.parametrize("dim,nbits", [(d, b) for d in DIMS for b in (1, 2, 4, 8) if d % (8 * b) == 0])
def test_decompress_lowers_for_cuda(dim, nbits, rows):
    args = (S((rows, dim), f32), S((rows, dim * nbits // 8), u8), S((1 << nbits,), f32))
    text = lower(_decompress(nbits), *args, platform="cuda", name=f"decompress(nbits={nbits})")
    assert_triton_kernel(text, "colbert_decompress")


@pytest.mark.parametrize("lq,n", QUERIES)
@pytest.mark.parametrize("L", DOC_LENGTHS)
@pytest.mark.parametrize("centroids", [1000, 65536])
def test_centroid_interaction_lowers_for_cuda(centroids, L, lq, n):
    args = (S((centroids + 1, lq), f32), S((n, L), i32))
    text = lower(_interaction, *args, platform="cuda", name="centroid_interaction")
    assert_triton_kernel(text, "colbert_centroid_interaction")


def test_a_failure_names_the_function_and_shape():
    """The check is real: a block Triton cannot take (size 3, not a power of two) fails, and says where."""
    from jax.experimental import pallas as pl

    from pallas_kernels.dispatch import compiler_params

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    def bad(x):
        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), compiler_params=compiler_params("cuda")
        )(x)

    with pytest.raises(AssertionError, match=r"bad_kernel does not lower for cuda at \(float32\[3\]\).*power of 2"):
        lower(bad, S((3,), f32), platform="cuda", name="bad_kernel")
