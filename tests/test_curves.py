"""bench/curves.py: one panel per variant, a variant being its model config and [features]."""

from bench.curves import _panels


def test_features_rows_get_their_own_panels():
    feats = {"user": ["age_bucket"]}
    model = {"arch": "longer"}
    runs = [
        {"seed": s, "model": model, "features": f, "curve": [{"step": 50, "val_auc": 0.7}]}
        for f in (None, feats)
        for s in (1, 0)
    ]
    rows = [
        {"table": "features", "variant": "LONGER without features", "config": model, "features": None},
        {"table": "features", "variant": "LONGER with features", "config": model, "features": feats},
    ]
    panels = _panels({"runs": runs, "rows": rows})
    assert [label for label, _ in panels] == ["LONGER without features", "LONGER with features"]
    assert [[r["seed"] for r in rs] for _, rs in panels] == [[0, 1], [0, 1]]
    assert all(r["features"] is None for r in panels[0][1]) and all(r["features"] for r in panels[1][1])
