"""``python -m fd_ray_sync.gpucheck``: the one-GPU check (see the package's docstring)."""

import sys

from .parent import main

if __name__ == "__main__":
    sys.exit(main())
