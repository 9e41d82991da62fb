"""Pallas kernels for PLAID, each beside a plain `jnp` reference of the same function.

On CPU the kernels run with `interpret=True`; on GPU they compile (Triton or Mosaic GPU).
"""
