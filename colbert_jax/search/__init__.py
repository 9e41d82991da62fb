"""Search: PLAID stages (`plaid.py`), brute force (`exact.py`), orchestration (`searcher.py`), `Ranking`."""
