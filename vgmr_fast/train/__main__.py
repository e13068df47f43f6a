"""``python -m vgmr_fast.train [options]``: the same as ``vgmr-fast train [options]``."""
from .cli import main

main()
