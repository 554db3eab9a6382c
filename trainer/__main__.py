"""`torchrun --nproc_per_node N -m trainer --config FILE --data DATA --out RUN [--resume] [k=v ...]`."""

import sys

from longer_cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
