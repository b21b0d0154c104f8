"""``python -m bench``: the prefetch-depth benchmark (see ``bench/depth.py``)."""

from bench.depth import main

main()
