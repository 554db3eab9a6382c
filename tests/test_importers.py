import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store.builder import BuildConfig, build
from feature_store.importers import GENRES, import_movielens, import_taobao
from feature_store.schema import LogError, read_log
from tests.conftest import shared_dataset


@pytest.mark.parametrize("name,rows,users", [("ml-latest-small", 100_836, 610), ("ml-100k", 100_000, 943)])
def test_movielens_imports_and_builds(tmp_path, name, rows, users):
    src = shared_dataset(name)
    summary = import_movielens(src, tmp_path / "log", progress=False)
    assert summary["rows"] == rows
    t = read_log(tmp_path / "log")
    action, label = t["action"].to_numpy(), t["label"].to_numpy()
    assert set(np.unique(action)) <= set(range(1, 11))
    assert (label == (action >= 8)).all()  # label = rating >= 4, action = rating * 2
    assert t["category_id"].to_numpy().max() < len(GENRES)
    meta = build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=3000, test_days=30), progress=False)
    assert meta["rows"]["users"] == users and meta["rows"]["train"] + meta["rows"]["eval"] == rows
    assert meta["rows"]["eval"] > 0
    if name == "ml-latest-small":
        assert meta["hist_len"]["max"] >= 2000  # histories up to 2,698


def test_movielens_first_genre_and_shared_ids(tmp_path):
    latest = import_movielens(shared_dataset("ml-latest-small"), tmp_path / "a", progress=False)
    t = read_log(latest["out"])
    toy_story = t.filter(t["item_id"].to_numpy() == 1)  # Adventure|Animation|Children|Comedy|Fantasy
    assert set(toy_story["category_id"].to_pylist()) == {GENRES.index("Adventure")}
    old = read_log(import_movielens(shared_dataset("ml-100k"), tmp_path / "b", progress=False)["out"])
    toy_story_100k = old.filter(old["item_id"].to_numpy() == 1)  # Animation|Children's|Comedy
    assert set(toy_story_100k["category_id"].to_pylist()) == {GENRES.index("Animation")}


def test_movielens_bad_inputs(tmp_path):
    with pytest.raises(LogError, match="not a MovieLens directory"):
        import_movielens(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "movies.csv").write_text("movieId,title,genres\n1,A,Comedy\n2,B,Polka\n")
    (tmp_path / "ml" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n")
    with pytest.raises(LogError, match="movies.csv, column 'genres', row 1: unknown genre 'Polka'"):
        import_movielens(tmp_path / "ml", tmp_path / "out", progress=False)
    (tmp_path / "ml" / "movies.csv").write_text("movieId,title,genres\n1,A,Comedy\n")
    (tmp_path / "ml" / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,9,3.0,101\n"
    )
    with pytest.raises(LogError, match="row 1: movie 9 is rated but not listed"):
        import_movielens(tmp_path / "ml", tmp_path / "out", progress=False)
    (tmp_path / "ml" / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,100\n-2,1,3.0,101\n"
    )
    with pytest.raises(LogError, match="column 'user_id', row 1: negative id"):
        import_movielens(tmp_path / "ml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def write_taobao(path, rows):
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_taobao_import_and_build(tmp_path):
    rng = np.random.default_rng(0)
    beh = np.array(["pv", "fav", "cart", "buy"])
    rows = [
        (
            rng.integers(1, 30),
            rng.integers(1, 500),
            rng.integers(1, 20),
            beh[rng.choice(4, p=[0.85, 0.05, 0.05, 0.05])],
            1_511_600_000 + rng.integers(0, 8 * 86400),
        )
        for _ in range(3000)
    ]
    src = write_taobao(tmp_path / "UserBehavior.csv", rows)
    summary = import_taobao(src, tmp_path / "log", progress=False, block_size=4096)  # many blocks
    assert summary["rows"] == 3000
    t = read_log(tmp_path / "log")
    assert t["action"].to_pylist() == [{"pv": 1, "fav": 2, "cart": 3, "buy": 4}[r[3]] for r in rows]
    assert t["label"].to_pylist() == [int(r[3] != "pv") for r in rows]
    assert t["category_id"].to_pylist() == [r[2] for r in rows]
    meta = build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=100, test_days=1), progress=False)
    assert meta["rows"]["train"] + meta["rows"]["eval"] == 3000
    assert pq.read_table(tmp_path / "data" / "sequences").num_rows == meta["rows"]["users"]


def test_taobao_bad_rows(tmp_path):
    src = write_taobao(tmp_path / "a.csv", [(1, 2, 3, "pv", 1511600000), (1, 2, 3, "like", 1511600001)])
    with pytest.raises(LogError, match="a.csv, column 'behaviour', row 1: unknown behaviour 'like'"):
        import_taobao(src, tmp_path / "out", progress=False)
    src = write_taobao(tmp_path / "b.csv", [(1, 2, 3, "pv", 1511600000), (1, 2, 3, "pv", -5)])
    with pytest.raises(LogError, match="b.csv, column 'ts', row 1: negative ts"):
        import_taobao(src, tmp_path / "out", progress=False)
    with pytest.raises(LogError, match="missing file"):
        import_taobao(tmp_path / "nope.csv", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block_size", [64, 1 << 20])  # the bad line in a later block, or in the first
def test_taobao_unreadable_lines_are_named_by_file_and_line(tmp_path, block_size):
    good = [(1, 2, 3, "pv", 1511600000 + i) for i in range(20)]
    src = tmp_path / "UserBehavior.csv"
    src.write_text("".join(",".join(map(str, r)) + "\n" for r in good) + "1,2\n")
    with pytest.raises(LogError, match=r"UserBehavior.csv: line 21: expected 5 columns, got 2"):
        import_taobao(src, tmp_path / "out", progress=False, block_size=block_size)
    src.write_text("".join(",".join(map(str, r)) + "\n" for r in good) + "1,2,3,pv,soon\n")
    with pytest.raises(LogError, match=r"UserBehavior.csv: line 21, column 'ts': 'soon' is not an integer"):
        import_taobao(src, tmp_path / "out", progress=False, block_size=block_size)
    assert not (tmp_path / "out").exists()
