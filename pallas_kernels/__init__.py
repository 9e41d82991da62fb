"""Pallas kernels for PLAID, each beside a plain `jnp` twin (`*_reference`) of the same function.

One API per kernel, used by the codec and the search: `decompress`, `maxsim` and `centroid_interaction`,
each with `implementation` in {"auto", "pallas", "jnp"} (see `pallas_kernels.dispatch`). The Pallas path
compiles with Triton on GPUs and runs in interpret mode on CPU; any shape works (the wrappers pad to the
block sizes in `BLOCK_SIZES` and slice the results). `README.md` here says what each kernel reads and
writes, and what is verified on which platform.
"""

from pallas_kernels.centroid_interaction import centroid_interaction, centroid_interaction_reference
from pallas_kernels.decompress import decompress, decompress_reference
from pallas_kernels.dispatch import BLOCK_SIZES, BlockSizes
from pallas_kernels.maxsim import maxsim, maxsim_reference

__all__ = [
    "BLOCK_SIZES",
    "BlockSizes",
    "centroid_interaction",
    "centroid_interaction_reference",
    "decompress",
    "decompress_reference",
    "maxsim",
    "maxsim_reference",
]
