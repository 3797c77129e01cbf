import json

import pandas as pd
import pytest

from tasks.common import storage
from tasks.common.contract import GENERIC, PROGRESS, SUCCESS, Stats, execute_partition, figures


def _work_writing(rows, fail_after_write=False):
    def work(run):
        storage.write_parquet_atomic(run.output("out.parquet"), pd.DataFrame({"x": rows}))
        run.stats.add("out", len(rows))
        run.stats.reject("too_small", 2)
        if fail_after_write:
            raise RuntimeError("crash")

    return work


def test_success_manifest_and_skip(tmp_path):
    root = str(tmp_path)
    m = execute_partition("stage", 3, root, "h1", _work_writing([1, 2, 3]))
    assert not m["skipped"] and m["counts"]["out"] == 3 and m["rejected"] == {"too_small": 2}
    success = json.loads((tmp_path / "stage" / "h1" / "part-00003" / SUCCESS).read_text())
    assert success["config_hash"] == "h1" and set(success["outputs"]) == {"out.parquet"}
    assert len(success["outputs"]["out.parquet"]) == 64  # sha256
    calls = []
    m2 = execute_partition("stage", 3, root, "h1", lambda run: calls.append(run))
    assert m2["skipped"] and calls == []


def test_checkpoint_left_by_a_crash_after_the_marker_is_removed_on_skip(tmp_path):
    def work(run):
        run.checkpoint("x").append("b0", pd.DataFrame({"x": [1]}))
        storage.write_parquet_atomic(run.output("out.parquet"), pd.DataFrame({"x": [1]}))

    execute_partition("stage", 0, str(tmp_path), "h1", work)
    progress = tmp_path / "stage" / "h1" / "part-00000" / PROGRESS
    assert not progress.exists()
    (progress / "h1").mkdir(parents=True)
    (progress / "h1" / "chunk-0.parquet").write_bytes(b"left by a crash")
    assert execute_partition("stage", 0, str(tmp_path), "h1", work)["skipped"]
    assert not progress.exists()


def test_outputs_are_hashed_as_written_not_read_back(tmp_path, monkeypatch):
    import hashlib

    earlier = tmp_path / "stage" / "h1" / "part-00000" / "earlier.bin"  # left by an interrupted run
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"from before")

    def work(run):
        storage.write_bytes_atomic(run.output("a.bin"), b"first")
        storage.write_bytes_atomic(run.output("a.bin"), b"second")  # the last write counts
        storage.write_bytes_atomic(run.path("staged.bin"), b"moved")
        storage.move(run.path("staged.bin"), run.output("b.bin"))
        run.output("earlier.bin")

    read = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: read.append(url) or real_read(url))
    outputs = execute_partition("stage", 0, str(tmp_path), "h1", work)["outputs"]
    assert outputs == {
        name: hashlib.sha256(data).hexdigest()
        for name, data in [("a.bin", b"second"), ("b.bin", b"moved"), ("earlier.bin", b"from before")]
    }
    assert [url.rsplit("/", 1)[-1] for url in read] == ["earlier.bin"]


def test_a_changed_config_writes_a_new_version_next_to_the_old(tmp_path):
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))
    before = {p.name: p.read_bytes() for p in _partition(tmp_path).iterdir()}
    m = execute_partition("stage", 0, str(tmp_path), "h2", _work_writing([1, 2]))
    assert not m["skipped"] and m["counts"]["out"] == 2 and m["path"] == "stage/h2/part-00000"
    assert {p.name: p.read_bytes() for p in _partition(tmp_path).iterdir()} == before  # h1 untouched
    assert execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))["skipped"]


def test_crash_leaves_no_success_marker(tmp_path):
    with pytest.raises(RuntimeError):
        execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1], fail_after_write=True))
    assert not (_partition(tmp_path) / SUCCESS).exists()
    m = execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))
    assert not m["skipped"]


def test_atomic_write_never_leaves_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "a" / "file.bin"
    storage.write_bytes_atomic(str(target), b"one")
    real_replace = __import__("os").replace

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(str(target), b"two")
    monkeypatch.setattr("os.replace", real_replace)
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_storage_works_on_memory_filesystem():
    url = "memory://editforge-test/x/y.json"
    storage.write_json_atomic(url, {"a": 1})
    assert storage.read_json(url) == {"a": 1}
    found = storage.list_files("memory://editforge-test/x", "*.json")
    assert len(found) == 1 and found[0].startswith("memory://") and found[0].endswith("/x/y.json")
    assert storage.read_json(found[0]) == {"a": 1}


def test_checkpoint_append_is_idempotent(tmp_path):
    def work(run):
        ck = run.checkpoint("k")
        ck.append("batch-a", pd.DataFrame({"k": ["a", "b"]}))
        ck.append("batch-a", pd.DataFrame({"k": ["a", "b"]}))  # the same batch again: overwritten
        ck.append("batch-c", pd.DataFrame({"k": ["c"]}))
        assert ck.done_keys() == {"a", "b", "c"}
        assert len(ck.load()) == 3
        storage.write_bytes_atomic(run.output("x"), b"x")

    execute_partition("s", 0, str(tmp_path), "h", work)
    # progress chunks are removed once the partition is done
    assert not (tmp_path / "s" / "h" / "part-00000" / "_progress").exists()


def test_stats_summary_quantiles():
    s = Stats()
    s.observe("v", [0.0, 1.0, 2.0, 3.0, 4.0])
    s.add("n", 2)
    s.add("n")
    out = s.summary()
    assert out["counts"]["n"] == 3
    assert out["quantiles"]["v"]["q50"] == 2.0 and out["quantiles"]["v"]["n"] == 5


def test_partition_stats_merge_with_plus_and_sum_into_stage_totals():
    a, b = Stats(), Stats()
    a.add("out", 3), a.reject("blurry", 1), a.observe("v", [1.0]), a.timings.update(render=1.5)
    b.add("out", 2), b.add("in", 9), b.reject("blurry", 2), b.reject("dark"), b.observe("v", [2.0, 3.0])
    b.timings.update(render=0.5, decode=1.0)
    total = a + b
    assert total.counts == {"out": 5, "in": 9} and total.rejected == {"blurry": 3, "dark": 1}
    assert total.timings == {"render": 2.0, "decode": 1.0} and total.values == {"v": [1.0, 2.0, 3.0]}
    assert a.counts == {"out": 3} and b.values == {"v": [2.0, 3.0]}  # the terms are left as they were
    assert sum([a, b]) == total and sum([a]) == a and sum([], Stats()) == Stats()
    assert Stats.of({"counts": {"out": 1}, "rejected": {"dark": 1}, "timings_s": {"render": 0.5}}) == Stats(
        {"out": 1}, {"dark": 1}, {"render": 0.5}
    )


def _old_format(manifest):
    """A manifest as versions before the `figures` section wrote it: the stage's figures at the top level."""
    return {k: v for k, v in manifest.items() if k not in ("figures", "skipped")} | manifest["figures"]


def test_a_stages_figures_sit_in_their_own_section_and_a_manifest_written_before_it_still_reads(tmp_path):
    def work(run):
        _work_writing([1, 2])(run)
        run.figures.update(pass_rate=0.5, shards=[{"name": "a.tar"}], summary={"loss": 1.0})

    m = execute_partition("stage", 0, str(tmp_path), "h1", work)
    success = json.loads((_partition(tmp_path) / SUCCESS).read_text())
    assert set(success) == (GENERIC - {"skipped"}) | {"figures"}  # generic fields at the top, nothing else
    own = {"pass_rate": 0.5, "shards": [{"name": "a.tar"}], "summary": {"loss": 1.0}}
    assert figures(success) == figures(m) == success["figures"] == own

    # a run directory finished by an older version (figures at the top level): still done, same figures
    (_partition(tmp_path) / SUCCESS).write_text(json.dumps(_old_format(success)))
    calls = []
    again = execute_partition("stage", 0, str(tmp_path), "h1", lambda run: calls.append(run))
    assert again["skipped"] and calls == [] and "figures" not in again and figures(again) == own


def test_reading_an_unfinished_or_stale_upstream_partition_is_a_clear_error(tmp_path):
    from tasks.common.contract import MissingInputError

    def reader(run):
        run.input_path("up", "data.parquet")

    inputs = {"up": (0, "h-up")}
    with pytest.raises(MissingInputError, match=r"needs up part-00000 to be finished first"):
        execute_partition("down", 0, str(tmp_path), "h", reader, inputs=inputs)
    execute_partition("up", 0, str(tmp_path), "h-other", _work_writing([1]))  # another version: not this one
    with pytest.raises(MissingInputError, match=r"needs up part-00000 to be finished first .*h-up"):
        execute_partition("down", 0, str(tmp_path), "h", reader, inputs=inputs)
    import shutil  # a marker of another config where this one's should be (copied by hand)

    shutil.copytree(tmp_path / "up" / "h-other", tmp_path / "up" / "h-up")
    with pytest.raises(
        MissingInputError, match=r"produced under another config \(hash h-other.*expects h-up"
    ):
        execute_partition("down", 0, str(tmp_path), "h", reader, inputs=inputs)
    shutil.rmtree(tmp_path / "up" / "h-up")
    execute_partition("up", 0, str(tmp_path), "h-up", _work_writing([1]))
    execute_partition("down", 0, str(tmp_path), "h", reader, inputs=inputs)  # now fine


def test_checkpoint_appends_report_progress_through_the_hook(tmp_path):
    from tasks.common.contract import PROGRESS_HOOK

    seen = []

    def work(run):
        ck = run.checkpoint("k", expected=4)
        ck.append("a", pd.DataFrame({"k": ["a", "b"]}))
        ck.append("a", pd.DataFrame({"k": ["a", "b"]}))  # a rewritten batch does not count twice
        ck.append("c", pd.DataFrame({"k": ["c", "d"]}))
        storage.write_bytes_atomic(run.output("x"), b"x")

    token = PROGRESS_HOOK.set(lambda fraction, figures: seen.append((fraction, figures)))
    try:
        execute_partition("s", 0, str(tmp_path), "h", work)
    finally:
        PROGRESS_HOOK.reset(token)
    assert seen == [
        (0.5, {"done": 2, "expected": 4}),
        (0.5, {"done": 2, "expected": 4}),
        (1.0, {"done": 4, "expected": 4}),
    ]


def test_a_checkpoint_counts_the_rows_its_stage_calls_ok(tmp_path):
    from tasks.common.contract import PROGRESS_HOOK

    seen = []

    def work(run):
        ck = run.checkpoint("k", expected=3, ok=("state", "good"))
        ck.append("a", pd.DataFrame({"k": ["a", "b"], "state": ["good", "bad"]}))
        ck.append("a", pd.DataFrame({"k": ["a", "b"], "state": ["good", "bad"]}))  # not counted twice
        ck.append("c", pd.DataFrame({"k": ["c"], "state": ["good"]}))
        storage.write_bytes_atomic(run.output("x"), b"x")

    token = PROGRESS_HOOK.set(lambda fraction, figures: seen.append(figures))
    try:
        execute_partition("s", 0, str(tmp_path), "h", work)
    finally:
        PROGRESS_HOOK.reset(token)
    assert [f["ok"] for f in seen] == [1, 1, 2] and seen[-1]["done"] == 3


def _partition(tmp_path, pid=0, config_hash="h1"):
    return tmp_path / "stage" / config_hash / f"part-{pid:05d}"


def test_a_deleted_or_resized_output_is_detected_and_the_partition_redone(tmp_path, caplog):
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]))
    out = _partition(tmp_path) / "out.parquet"
    good = out.read_bytes()
    out.unlink()
    m = execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]))
    assert not m["skipped"] and out.read_bytes() == good
    assert f"{out} is missing" in caplog.text
    out.write_bytes(good[:-10])  # truncated
    assert not execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]))["skipped"]
    assert "bytes, " in caplog.text and out.read_bytes() == good


def test_flipped_bytes_are_found_with_sha256_verification(tmp_path, caplog):
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]))
    out = _partition(tmp_path) / "out.parquet"
    good = bytearray(out.read_bytes())
    good[len(good) // 2] ^= 0xFF
    out.write_bytes(bytes(good))  # same size: the cheap check cannot see it
    assert execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]))["skipped"]
    m = execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1, 2]), verify="sha256")
    assert not m["skipped"] and "does not have the recorded sha256" in caplog.text
    assert bytes(good) != out.read_bytes()


def test_a_failed_attempt_under_another_config_keeps_the_finished_partition(tmp_path):
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))
    before = {p.name: p.read_bytes() for p in _partition(tmp_path).iterdir()}

    def broken(run):
        raise ValueError("a missing model")

    with pytest.raises(ValueError):
        execute_partition("stage", 0, str(tmp_path), "h2", broken)
    assert {p.name: p.read_bytes() for p in _partition(tmp_path).iterdir()} == before
    assert execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))["skipped"]


def test_a_marker_of_another_config_in_the_folder_keeps_its_outputs_until_replaced(tmp_path):
    def writes(*names):
        def work(run):
            for name in names:
                storage.write_bytes_atomic(run.output(name), name.encode())

        return work

    import shutil

    execute_partition("stage", 0, str(tmp_path), "h1", writes("a.bin", "shards/b.bin"))
    shutil.copytree(_partition(tmp_path), _partition(tmp_path, config_hash="h2"))  # copied there by hand
    m = execute_partition("stage", 0, str(tmp_path), "h2", writes("a.bin"))
    assert set(m["outputs"]) == set(m["sizes"]) == {"a.bin"}
    copied = _partition(tmp_path, config_hash="h2")
    assert not (copied / "shards" / "b.bin").exists() and (copied / "a.bin").exists()
    assert (_partition(tmp_path) / "shards" / "b.bin").exists()


def test_an_unreadable_marker_is_reported_by_path_and_counts_as_not_done(tmp_path, caplog):
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))
    marker = _partition(tmp_path) / SUCCESS
    marker.write_text('{"config_hash": "h1", "outp')  # cut short
    assert not execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))["skipped"]
    assert f"{marker} cannot be read" in caplog.text and json.loads(marker.read_text())["config_hash"] == "h1"


def test_temporary_files_of_a_killed_write_are_removed_when_the_partition_runs(tmp_path):
    left = _partition(tmp_path) / "_progress" / "h1" / "chunk-0.parquet.tmp-0a1b2c3d"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a chunk")
    execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))
    assert not list(_partition(tmp_path).rglob("*.tmp-*"))


def test_damaged_upstream_outputs_are_a_clear_error(tmp_path):
    from tasks.common.contract import MissingInputError

    execute_partition("up", 0, str(tmp_path), "h-up", _work_writing([1]))
    (tmp_path / "up" / "h-up" / "part-00000" / "out.parquet").unlink()
    with pytest.raises(
        MissingInputError, match=r"up part-00000, whose outputs are damaged .*out.parquet is missing"
    ):
        execute_partition("down", 0, str(tmp_path), "h", lambda run: None, inputs={"up": (0, "h-up")})


HOLDER = """
import sys
import pandas as pd
from tasks.common import storage
from tasks.common.contract import execute_partition

def work(run):
    run.checkpoint("k").append("a", pd.DataFrame({"k": ["a"]}))
    print("working", flush=True)
    sys.stdin.readline()  # holds the partition until the test says go on
    storage.write_bytes_atomic(run.output("out.bin"), b"from the first process")

execute_partition("stage", 0, sys.argv[1], "h1", work)
"""


def test_a_second_process_waits_for_the_partition_then_skips_it(tmp_path):
    """No clock: the first process holds the partition until the second has said it is waiting for it."""
    import logging
    import subprocess
    import sys
    import threading
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert first.stdout.readline().strip() == "working"
    chunks = list(_partition(tmp_path).rglob("chunk-*.parquet"))
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for"):
                waiting.set()

    logger = logging.getLogger("editforge.test-lease-wait")
    logger.addHandler(Seen())
    logger.setLevel(logging.INFO)
    calls, result = [], {}
    second = threading.Thread(
        target=lambda: result.update(
            execute_partition("stage", 0, str(tmp_path), "h1", lambda run: calls.append(run), logger)
        )
    )
    second.start()
    assert waiting.wait(120), "the second process never waited for the lease"
    first.stdin.write("go on\n")
    first.stdin.flush()
    assert first.wait(timeout=120) == 0
    second.join(120)
    assert result["skipped"] and not calls  # it waited, then found it done
    assert chunks and (_partition(tmp_path) / "out.bin").read_bytes() == b"from the first process"
    assert not (tmp_path / "stage" / "h1" / "_leases" / "part-00000.json").exists()


def test_a_lease_whose_owner_is_gone_is_taken_over(tmp_path, monkeypatch):
    import socket
    import subprocess
    import time

    lease = tmp_path / "stage" / "h1" / "_leases" / "part-00000.json"
    lease.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease.write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "x", "heartbeat": time.time()})
    )
    assert not execute_partition("stage", 0, str(tmp_path), "h1", _work_writing([1]))["skipped"]
    # another host's lease: taken over once its heartbeat is older than the TTL
    monkeypatch.setenv("EDITFORGE_LEASE_TTL_S", "1")
    t0 = time.monotonic()
    lease = lease.with_name("part-00001.json")
    lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y", "heartbeat": time.time()}))
    assert not execute_partition("stage", 1, str(tmp_path), "h1", _work_writing([1]))["skipped"]
    assert 0.5 < time.monotonic() - t0 < 30 and not lease.exists()


def test_only_the_projects_own_permanent_errors_are_permanent():
    import pyarrow as pa

    from tasks.common.contract import MissingInputError
    from tasks.common.errors import InputError, MissingFileError, is_permanent
    from tasks.common.storage import UnreadableFileError, WriteError

    for err in (
        InputError("x"),
        MissingFileError("x"),
        MissingInputError("x"),
        UnreadableFileError("x"),
        WriteError("x", 28),
    ):
        assert is_permanent(err), type(err).__name__
    for err in (
        ValueError("x"),
        FileNotFoundError("x"),
        KeyError("x"),
        pa.ArrowInvalid("x"),
        OSError(28, "x"),
    ):
        assert not is_permanent(err), type(err).__name__  # a library's: retried unless the project wraps it
