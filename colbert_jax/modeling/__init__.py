"""The ColBERT network: BERT backbone (`bert.py`), ColBERT head (`colbert.py`), weight mapping (`convert.py`)."""
