"""MovieLens importers' profile and item columns (issue 15), on tiny synthetic files in tmp
dirs, and on the real shared files (read-only) for the shipped config."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tomllib

from feature_store.builder import BuildConfig, build
from feature_store.importers import GENRES, OCCUPATIONS, import_movielens
from feature_store.schema import LogError, read_log, scan_log
from longer.spec import FeatureSpec
from tests.conftest import shared_dataset

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ml100k_features.toml"


def flags(*genres):
    return "|".join("1" if g in genres else "0" for g in GENRES[:19])


def tiny_100k(d: Path, users="1|24|M|technician|85711\n2|17|F|other|T8H1N\n3|56|M|writer|02139\n") -> Path:
    d.mkdir()
    toy = flags("Animation", "Children's", "Comedy")
    (d / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{toy}\n2|Mystery (?)|||http://y|{flags()}\n",
        encoding="latin1",
    )
    (d / "u.user").write_text(users)
    (d / "u.data").write_text("1\t1\t5\t100\n2\t2\t3\t200\n3\t1\t4\t300\n1\t2\t1\t400\n")
    return d


def test_ml100k_profile_and_item_columns(tmp_path):
    summary = import_movielens(tiny_100k(tmp_path / "ml"), tmp_path / "log", progress=False)
    schema, _, _ = scan_log(summary["out"])
    assert schema.kinds == {
        "category_id": "int",
        "action": "int",
        "age_bucket": "int",
        "gender": "int",
        "occupation": "int",
        "zip_prefix": "int",
        "year": "int",
        "genres": "list",
    }
    t = read_log(summary["out"]).to_pydict()
    assert t["user_id"] == [1, 2, 3, 1]
    assert t["age_bucket"] == [18, 1, 56, 18]
    assert t["gender"] == [1, 2, 1, 1]
    occ = {o: i + 1 for i, o in enumerate(OCCUPATIONS)}
    assert t["occupation"] == [occ["technician"], occ["other"], occ["writer"], occ["technician"]]
    assert t["zip_prefix"] == [858, 0, 22, 858]  # 1 + first three digits; 0: not a US zip
    toy = [GENRES.index(g) for g in ("Animation", "Children's", "Comedy")]
    assert t["genres"] == [toy, [0], toy, [0]]  # no genre flagged: [unknown]
    assert t["year"] == [1995, 0, 1995, 0]
    assert t["category_id"] == [toy[0], 0, toy[0], 0]  # the first genre, as before


def test_ml100k_user_file_errors(tmp_path):
    with pytest.raises(LogError, match=r"u.user, column 'occupation', row 1: unknown occupation 'pilot'"):
        import_movielens(
            tiny_100k(tmp_path / "a", "1|24|M|other|1\n2|30|F|pilot|1\n"), tmp_path / "o", progress=False
        )
    with pytest.raises(
        LogError, match=r"u.data, column 'user', row 2: user 3 rated but is not listed in u.user"
    ):
        import_movielens(
            tiny_100k(tmp_path / "b", "1|24|M|other|1\n2|30|F|other|1\n"), tmp_path / "o", progress=False
        )
    d = tiny_100k(tmp_path / "c")
    (d / "u.user").unlink()
    with pytest.raises(LogError, match="u.user: missing file"):
        import_movielens(d, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_ml_latest_genres_list_and_year(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Adventure|Children\n2,"Odd, The",(no genres listed)\n'
    )
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.0,101\n")
    t = read_log(import_movielens(d, tmp_path / "log", progress=False)["out"])
    assert t.schema.field("genres").type == pa.list_(pa.int64())
    assert t["genres"].to_pylist() == [[GENRES.index("Adventure"), GENRES.index("Children's")], [0]]
    assert t["year"].to_pylist() == [1995, 0]
    assert t["category_id"].to_pylist() == [GENRES.index("Adventure"), 0]


@pytest.mark.parametrize("name", ["ml-100k", "ml-latest-small"])
def test_real_movielens_columns(tmp_path, name):
    t = read_log(import_movielens(shared_dataset(name), tmp_path / "log", progress=False)["out"])
    toy = t.filter(t["item_id"].to_numpy() == 1)
    assert toy["year"].to_pylist()[0] == 1995
    want = (
        ("Animation", "Children's", "Comedy")
        if name == "ml-100k"
        else ("Adventure", "Animation", "Children's", "Comedy", "Fantasy")
    )
    assert toy["genres"].to_pylist()[0] == [GENRES.index(g) for g in want]
    if name == "ml-100k":  # user 1: 24, M, technician, 85711
        u1 = t.filter(t["user_id"].to_numpy() == 1)
        assert set(u1["age_bucket"].to_pylist()) == {18} and set(u1["gender"].to_pylist()) == {1}
        assert set(u1["occupation"].to_pylist()) == {OCCUPATIONS.index("technician") + 1}
        assert set(u1["zip_prefix"].to_pylist()) == {858}
        assert len(np.unique(t["occupation"].to_numpy())) == len(OCCUPATIONS)


def test_shipped_ml100k_config_builds(tmp_path):
    """configs/ml100k_features.toml declares columns that the ml-100k import has, and resolves."""
    table = tomllib.loads(CONFIG.read_text())["features"]
    spec = FeatureSpec.from_config(table)
    assert set(spec.user) == {"age_bucket", "gender", "occupation", "zip_prefix"}
    assert {"genres", "year"} <= set(spec.candidate)
    import_movielens(shared_dataset("ml-100k"), tmp_path / "log", progress=False)
    meta = build(
        tmp_path / "log", tmp_path / "data", BuildConfig(max_len=64, test_days=30), progress=False, spec=spec
    )
    resolved = spec.resolve(meta)
    assert "genres" in resolved.lists
    assert resolved.buckets["occupation"] == len(OCCUPATIONS) + 2
