"""Split a behaviour log by time into the past (to train on and bootstrap the online store
with) and the last days (to replay against the running service as live traffic).

    python deploy/split_log.py --log LOG --days D --past OUT_PAST --live OUT_LIVE

docker-compose's trainer uses it so that the store holds exactly the world as of the split
and `--profile replay` then plays the held-back days through serving: the replayed requests'
histories are the ones an offline evaluation would see, and the events they post are new.
Reads the whole log into memory (the log contract's reader): meant for demo-sized logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.io import atomic_dir
from feature_store.schema import read_log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="behaviour log (parquet file or directory)")
    p.add_argument("--days", type=float, required=True, help="the live part: the log's last D days")
    p.add_argument("--past", required=True, help="output log: events before the split")
    p.add_argument("--live", required=True, help="output log: events from the split on")
    a = p.parse_args(argv)
    table = read_log(a.log)
    if table.num_rows == 0:
        print(f"split_log: {a.log}: empty log", file=sys.stderr)
        return 2
    split_ts = int(pc.max(table.column("ts")).as_py()) - int(a.days * 86400)
    past = pc.less(table.column("ts"), split_ts)
    for out, mask in ((a.past, past), (a.live, pc.invert(past))):
        with atomic_dir(out, overwrite=True) as tmp:
            pq.write_table(table.filter(mask), Path(tmp) / "part-0.parquet")
    rows = {"past": int(pc.sum(past).as_py() or 0)}
    rows["live"] = table.num_rows - rows["past"]
    print(json.dumps({"split_ts": split_ts, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
