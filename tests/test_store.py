"""ResultStore: resumable results files that several processes may fill at once."""

from __future__ import annotations

import json
import multiprocessing as mp

from prunekit.reproduce.store import ResultStore


def _fill(path: str, prefix: str, n: int) -> None:
    store = ResultStore(path, "grid")
    for i in range(n):
        store.put(f"{prefix}/{i}", {"value": i})


def test_two_stores_on_one_file_lose_no_key(tmp_path):
    path = tmp_path / "r.json"
    a, b = ResultStore(path, "grid"), ResultStore(path, "grid")  # both opened before either wrote
    a.put("seed0", {"acc": 0.1})
    b.put("seed1", {"acc": 0.2})
    a.put("seed0b", {"acc": 0.3})
    runs = json.loads(path.read_text())["runs"]
    assert sorted(runs) == ["seed0", "seed0b", "seed1"]
    assert runs["seed1"]["acc"] == 0.2 and ResultStore(path, "grid").done("seed1")


def test_concurrent_processes_lose_no_key(tmp_path):
    path = str(tmp_path / "r.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fill, args=(path, p, 15)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = json.loads(open(path).read())["runs"]
    assert sorted(runs) == sorted(f"{p}/{i}" for p in ("a", "b") for i in range(15))
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the lock file is removed by its last holder


def _reject(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """A diverged run (loss NaN) must not make the results file invalid JSON for strict readers."""
    path = tmp_path / "r.json"
    ResultStore(path, "grid").put("diverged", {"loss": float("nan"), "curve": [1.0, float("inf"), -float("inf")]})
    runs = json.loads(path.read_text(), parse_constant=_reject)["runs"]
    assert runs["diverged"]["loss"] is None and runs["diverged"]["curve"] == [1.0, None, None]


def test_a_rerun_in_another_process_is_not_overwritten_by_a_stale_copy(tmp_path):
    """Two stores read the same finished grid; each re-runs half of it. The file ends with both halves' new records
    (a store used to write back its stale copy of the other half)."""
    path = tmp_path / "r.json"
    first = ResultStore(path, "x")
    for k in ("a", "b"):
        first.put(k, {"v": 0})
    one, two = ResultStore(path, "x"), ResultStore(path, "x")
    one.put("a", {"v": 1})
    two.put("b", {"v": 2})
    one.put("c", {"v": 3})  # saves again, after two's write
    runs = json.loads(path.read_text())["runs"]
    assert {k: r["v"] for k, r in runs.items()} == {"a": 1, "b": 2, "c": 3}
