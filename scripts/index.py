"""`colbert-jax index` as a script: python scripts/index.py --help"""

import sys

from colbert_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
