"""`torchrun --nproc_per_node N -m trainer --config FILE --data DATA --out RUN [--resume] [k=v ...]`."""

import sys

from .threads import passive_wait_default

passive_wait_default()  # before anything imports torch (trainer/threads.py)

from .cli import main  # noqa: E402

sys.exit(main())
