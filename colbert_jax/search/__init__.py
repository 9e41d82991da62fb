"""Search, in the order data flows: the index's device arrays (`arrays.py`, placed by `placement.py`), PLAID's
stages (`candidates.py` 1-2, `pruning.py` 4-5, `exact_scoring.py` 6) composed by its engine (`plaid.py`,
memory-mapped reads in `streamed_mmap.py`), the WARP engine (`warp.py`), brute force (`exact.py`), and
`Searcher` (`searcher.py`) -> `Ranking` (`ranking.py`)."""
