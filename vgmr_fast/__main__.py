"""``python -m vgmr_fast``: the same as the ``vgmr-fast`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
