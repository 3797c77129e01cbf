"""Local folders built atomically (`storage.local_dir_atomic`): the tiny models' cache, a trained model, the
world's weights."""

import pytest

from tasks.common.storage import local_dir_atomic


def test_local_dir_atomic_replaces_keeps_or_leaves_nothing(tmp_path):
    final = tmp_path / "model"
    with local_dir_atomic(final) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not final.exists()  # nothing at the final name until the block succeeds
    assert (final / "a.txt").read_text() == "one" and final.stat().st_mode & 0o777 == 0o755
    with local_dir_atomic(final) as tmp:  # replaces
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    with local_dir_atomic(final, keep_existing=True) as tmp:  # another process was first: theirs stays
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), local_dir_atomic(final) as tmp:
        (tmp / "d.txt").write_text("half")
        raise RuntimeError("killed mid-build")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_a_write_a_retry_cannot_fix_names_the_path_and_is_permanent(tmp_path):
    from tasks.common.errors import is_permanent
    from tasks.common.storage import WriteError, create_exclusive, write_bytes_atomic

    blocker = tmp_path / "run"
    blocker.write_text("a file where the run's folder should be")
    for write, url in ((write_bytes_atomic, f"{blocker}/captions/part-00000/x.parquet"),
                       (write_bytes_atomic, f"{blocker}/x.json"),
                       (create_exclusive, f"{blocker}/_leases/part-00000.json")):
        with pytest.raises(WriteError, match="a file is in the way where a folder should be") as err:
            write(url, b"{}")
        assert str(err.value).startswith(f"cannot write {url}: ") and is_permanent(err.value)
    assert blocker.read_text() == "a file where the run's folder should be"
