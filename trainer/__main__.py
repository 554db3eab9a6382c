"""`torchrun --nproc_per_node N -m trainer --config FILE --data DATA --out RUN [--resume] [k=v ...]`."""

import sys

from .cli import main

sys.exit(main())
