"""feature_store/columns.py: the flat-array helpers behind list and dense columns in batches."""

import itertools

import numpy as np
import pyarrow as pa

from feature_store.columns import (
    EventLists,
    concat_rows,
    jagged,
    normalised,
    ranges,
    segment_sums,
    take_rows,
)


def test_ranges_and_segment_sums_against_loops():
    rng = np.random.default_rng(0)
    starts, lengths = rng.integers(0, 50, 20), rng.integers(0, 5, 20)
    assert ranges(starts, lengths).tolist() == [i for s, n in zip(starts, lengths) for i in range(s, s + n)]
    values = rng.integers(0, 9, int(lengths.sum()))
    bounds = np.r_[0, np.cumsum(lengths)]
    assert segment_sums(values, lengths).tolist() == [
        values[a:b].sum() for a, b in itertools.pairwise(bounds)
    ]


def test_list_rows_take_concat_and_flatten():
    a = pa.array([[1, 2], [], [3]], pa.list_(pa.int64()))
    b = pa.array([[4, 5, 6]], pa.list_(pa.int64()))
    rows = concat_rows([take_rows(a, np.array([2, 0])), b])
    values, lengths = jagged(rows)
    assert values.tolist() == [3, 1, 2, 4, 5, 6] and lengths.tolist() == [1, 2, 3]
    values, lengths = jagged(rows[1:2])  # a slice keeps its own offsets
    assert values.tolist() == [1, 2] and lengths.tolist() == [2]
    assert take_rows(np.arange(5), np.array([4, 1])).tolist() == [4, 1]


def test_event_lists_take():
    parts = [
        EventLists.from_arrow(pa.array([[1], [2, 3], []], pa.list_(pa.int64()))),
        EventLists.from_arrow(pa.array([[7, 8, 9]], pa.list_(pa.int64()))),
    ]
    ev = EventLists.concat(parts)
    values, lengths = ev.take(np.array([3, 1, 2, 0]))
    assert values.tolist() == [7, 8, 9, 2, 3, 1] and lengths.tolist() == [3, 2, 0, 1]


def test_normalised():
    x = np.array([1.0, 3.0])
    assert normalised(x, 2.0, 1.0).tolist() == [-1.0, 1.0]
    assert normalised(x, 2.0, 0.0).tolist() == [-1.0, 1.0]  # constant column: only centred
    assert normalised(x, 0.0, 2.0).dtype == np.float32
