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
