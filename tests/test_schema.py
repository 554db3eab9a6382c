import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from feature_store.schema import LogError, read_log, scan_log, stable_hash
from tests.conftest import write_log

GOOD = {"user_id": [1, 2, 3], "item_id": [10, 11, 12], "ts": [100, 200, 300], "label": [0, 1, 1]}


def log_with(tmp_path, name="log.parquet", schema=None, **cols):
    return write_log(tmp_path / name, {**GOOD, **cols}, schema)


def expect_error(path, column, row, fragment):
    with pytest.raises(LogError) as e:
        read_log(path)
    msg = str(e.value)
    assert str(path) in msg or path.name in msg, msg
    if column is not None:
        assert f"column '{column}'" in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    assert fragment in msg, msg
    return msg


def test_good_log_is_canonical(tmp_path):
    t = read_log(log_with(tmp_path))
    assert t.schema.names == ["user_id", "item_id", "ts", "label"]
    assert t.schema.field("ts").type == pa.int64()
    assert t.schema.field("label").type == pa.int8()
    assert t["ts"].to_pylist() == [100, 200, 300]


@pytest.mark.parametrize("missing", ["user_id", "item_id", "ts", "label"])
def test_missing_required_column(tmp_path, missing):
    cols = {k: v for k, v in GOOD.items() if k != missing}
    path = write_log(tmp_path / "log.parquet", cols)
    expect_error(path, missing, None, "missing required column")


def test_wrong_type(tmp_path):
    path = log_with(tmp_path, item_id=["a", "b", "c"])
    expect_error(path, "item_id", None, "wrong type")


@pytest.mark.parametrize("col", ["user_id", "item_id", "category_id", "action"])
def test_null_id(tmp_path, col):
    base = {"category_id": [1, 2, 3], "action": [1, 1, 1]}
    path = log_with(tmp_path, **{**base, col: pa.array([5, None, 7], pa.int64())})
    expect_error(path, col, 1, "null")


@pytest.mark.parametrize("col", ["user_id", "item_id", "category_id"])
def test_negative_id(tmp_path, col):
    path = log_with(tmp_path, **{"category_id": [1, 2, 3], col: [1, 2, -4]})
    expect_error(path, col, 2, "negative id -4")


def test_unparseable_ts(tmp_path):
    path = log_with(tmp_path, ts=["2024-01-01T00:00:00Z", "yesterday", "2024-01-02T00:00:00Z"])
    expect_error(path, "ts", 1, "unparseable ts 'yesterday'")


def test_negative_ts(tmp_path):
    expect_error(log_with(tmp_path, ts=[5, -1, 7]), "ts", 1, "negative ts")


def test_null_ts(tmp_path):
    expect_error(log_with(tmp_path, ts=pa.array([5, 6, None], pa.int64())), "ts", 2, "null")


def test_milliseconds_as_int_refused(tmp_path):
    expect_error(log_with(tmp_path, ts=[1_700_000_000, 1_700_000_000_000, 3]), "ts", 1, "milliseconds")


@pytest.mark.parametrize("bad", [[0, 2, 1], [0, 1, -1]])
def test_label_not_binary(tmp_path, bad):
    row = next(i for i, v in enumerate(bad) if v not in (0, 1))
    expect_error(log_with(tmp_path, label=bad), "label", row, "label must be 0 or 1")


def test_label_wrong_type(tmp_path):
    expect_error(log_with(tmp_path, label=[0.0, 1.0, 0.5]), "label", None, "wrong type")


def test_row_index_counts_within_file_across_batches(tmp_path):
    n = 10
    cols = {
        "user_id": np.arange(n),
        "item_id": np.arange(n),
        "ts": np.arange(n),
        "label": np.zeros(n, np.int8),
    }
    cols["item_id"][7] = -3
    path = write_log(tmp_path / "log.parquet", cols)
    from feature_store.schema import iter_log

    with pytest.raises(LogError, match="row 7"):
        list(iter_log(path, batch_rows=3))


@pytest.mark.parametrize("unit,scale", [("s", 1), ("ms", 1000), ("us", 10**6), ("ns", 10**9)])
def test_timestamp_units_normalised_to_seconds(tmp_path, unit, scale):
    secs = [1_700_000_000, 1_700_000_001, 1_700_000_100]
    ts = pa.array([s * scale + scale // 2 for s in secs], pa.int64()).cast(pa.timestamp(unit))
    assert read_log(log_with(tmp_path, ts=ts))["ts"].to_pylist() == secs


def test_timezone_aware_and_string_and_date_ts(tmp_path):
    aware = pa.array(
        [dt.datetime(2024, 1, 1, 1, tzinfo=dt.timezone.utc)] * 3, pa.timestamp("s", tz="Europe/Paris")
    )
    expected = int(dt.datetime(2024, 1, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    assert read_log(log_with(tmp_path, "a.parquet", ts=aware))["ts"].to_pylist() == [expected] * 3
    strings = ["2024-01-01T01:00:00Z"] * 3
    assert read_log(log_with(tmp_path, "b.parquet", ts=strings))["ts"].to_pylist() == [expected] * 3
    dates = pa.array([dt.date(2024, 1, 1)] * 3, pa.date32())
    assert read_log(log_with(tmp_path, "c.parquet", ts=dates))["ts"].to_pylist() == [expected - 3600] * 3


def test_string_action_is_hashed_stably(tmp_path):
    t = read_log(log_with(tmp_path, action=["buy", "pv", "buy"]))
    assert t["action"].to_pylist() == [stable_hash("buy"), stable_hash("pv"), stable_hash("buy")]
    assert stable_hash("buy") == 1839765282554796002  # the same in every process and release


def test_directory_files_must_agree_on_columns(tmp_path):
    write_log(tmp_path / "log" / "a.parquet", {**GOOD, "category_id": [1, 2, 3]})
    b = write_log(tmp_path / "log" / "b.parquet", GOOD)
    with pytest.raises(LogError) as e:
        scan_log(tmp_path / "log")
    assert str(b) in str(e.value) and "column 'category_id'" in str(e.value)


def test_extra_columns_classified(tmp_path):
    path = log_with(tmp_path, shop_id=[1, 2, 3], p_true=[0.1, 0.2, 0.3], note=["x", "y", "z"])
    schema, _, total = scan_log(path)
    assert schema.extra_int == ("shop_id",) and schema.extra_float == ("p_true",)
    assert schema.ignored == ("note",) and total == 3
    assert "note" not in read_log(path).column_names


def test_not_parquet_and_empty_dir(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(LogError, match="not a readable parquet file"):
        read_log(tmp_path / "bad.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogError, match="no \\*.parquet files"):
        read_log(tmp_path / "empty")


# --- list<int64> columns (multi-valued categorical, issue 15) ----------------------------------


def test_list_columns_classified_and_canonical(tmp_path):
    genres = pa.array([[1, 2], [], [3]], pa.list_(pa.int32()))
    path = log_with(tmp_path, genres=genres, shop_id=[1, 2, 3])
    schema, _, _ = scan_log(path)
    assert schema.extra_list == ("genres",) and schema.extra_int == ("shop_id",)
    assert schema.kinds == {"shop_id": "int", "genres": "list"}
    t = read_log(path)
    assert t.schema.field("genres").type == pa.list_(pa.int64())
    assert t.column("genres").to_pylist() == [[1, 2], [], [3]]


def test_list_of_strings_is_not_a_list_column(tmp_path):
    schema, _, _ = scan_log(log_with(tmp_path, tags=pa.array([["a"], [], ["b"]])))
    assert schema.extra_list == () and schema.ignored == ("tags",)


@pytest.mark.parametrize(
    "values, row, fragment",
    [
        ([[1], None, [2]], 1, "null value"),
        ([[1], [2, None], [3]], 1, "null element"),
        ([[1], [], [4, -5]], 2, "negative id -5"),
    ],
)
def test_bad_list_values_name_the_row(tmp_path, values, row, fragment):
    path = log_with(tmp_path, genres=pa.array(values, pa.list_(pa.int64())))
    expect_error(path, "genres", row, fragment)


def test_logs_without_list_columns_read_as_before(tmp_path):
    schema, _, _ = scan_log(log_with(tmp_path, category_id=[1, 2, 3]))
    assert schema.extra_list == () and "extra_list" in schema.to_json()
    assert read_log(log_with(tmp_path, name="b.parquet")).column_names == [
        "user_id",
        "item_id",
        "ts",
        "label",
    ]
