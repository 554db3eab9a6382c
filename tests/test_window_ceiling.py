"""trainer.window_ceiling: the regression behind the window ceilings, and its input errors
(the ceilings on a long-range log: tests/test_synth_long_range.py)."""

import numpy as np
import pytest

from longer.errors import InputError, UsageError
from trainer.window_ceiling import logistic_fit, window_ceilings


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40_000, 3))
    true = np.array([-0.5, 1.5, -2.0, 0.0])  # intercept, then one per column
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-(true[0] + x @ true[1:])))).astype(float)
    np.testing.assert_allclose(logistic_fit(x, y, l2=0.0), true, atol=0.06)


def test_bad_windows_and_missing_columns_are_named(synth_dataset, tmp_path):
    with pytest.raises(UsageError, match="window lengths must be >= 1"):
        window_ceilings(synth_dataset, [64, 0])
    (tmp_path / "train").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"user_id": [1], "item_id": [2], "label": [1]}), tmp_path / "train" / "part-0.parquet"
    )
    with pytest.raises(
        InputError, match=r"train: the window ceilings need column\(s\) \['category_id', 'ts', 'hist_len'\]"
    ):
        window_ceilings(tmp_path, [64])
