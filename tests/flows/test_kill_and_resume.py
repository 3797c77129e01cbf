"""Integration tier: `kill -9` the whole DAG mid-render, run it again, get exactly the uninterrupted output;
two whole runs at once on one output root end with it too."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `fakes`

from fakes.faults import stop_after_writes, wait_stopped

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["captions.num_captions=12", "text.finetune_steps=150", "text.batch_size=4", "render.samples_per_triplet=4",
         "render.batch_samples=2", "render.steps=4", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1"]


def _generate(root: Path, home: Path, stop_after: tuple[int, str] | None = None) -> subprocess.Popen:
    """`python -m flows.generate` on the small demo; with ``stop_after`` (n, glob) it stops itself right after
    its n-th write matching glob (tests/fakes/faults.py), for a SIGKILL placed by that count."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    args = ["-m", "flows.generate", "--preset", "demo", "--set", f"output_root={root}"]
    for item in SMALL:
        args += ["--set", item]
    command = stop_after_writes(*stop_after, *args) if stop_after else [sys.executable, *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _digests(root: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern))}


STAGE_FILES = ("text/*/part-00000/triplets.parquet", "render/*/part-00000/samples.parquet",
               "filter/*/part-00000/kept.parquet", "render/*/part-00001/samples.parquet",
               "filter/*/part-00001/kept.parquet")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """One uninterrupted run: what every other run must end with."""
    root = tmp_path_factory.mktemp("clean")
    proc = _generate(root, root.parent / "prefect-home-clean")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return root


def _assert_same_outputs(run: Path, clean: Path) -> None:
    assert _digests(run, "*.tar") == _digests(clean, "*.tar") != {}
    assert _digests(run, "*.png") == _digests(clean, "*.png")
    for pattern in STAGE_FILES:  # the same config: the same version folders
        (stage_file,) = [p.relative_to(clean) for p in clean.glob(pattern)]
        assert (run / stage_file).read_bytes() == (clean / stage_file).read_bytes(), stage_file


def test_kill_during_render_then_rerun_equals_uninterrupted(tmp_path, clean):
    home = tmp_path / "prefect-home"
    crashed = tmp_path / "crashed"
    # placed by a count: right after render part-00000's first checkpoint chunk is written, not after a delay
    proc = _generate(crashed, home, stop_after=(1, "*/render/*/part-00000/_progress/*/chunk-*.parquet"))
    try:
        wait_stopped(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a node loss would
    proc.wait(timeout=60)
    assert len(list(crashed.glob("render/*/part-00000/_progress/*/chunk-*.parquet"))) == 1
    assert not list(crashed.glob("render/*/part-00000/_SUCCESS.json"))
    assert not (crashed / "pack").exists()

    proc = _generate(crashed, home)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "render part-00000: resuming with" in out
    _assert_same_outputs(crashed, clean)


def test_two_runs_at_once_on_one_root_end_with_complete_identical_outputs(tmp_path, clean):
    shared = tmp_path / "shared"
    runs = [_generate(shared, tmp_path / f"prefect-home-{i}") for i in range(2)]  # two servers, one root
    outs = [r.communicate(timeout=900)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [o[-3000:] for o in outs]
    assert "waiting for" in "".join(outs)  # one of them found a partition in the other's hands
    _assert_same_outputs(shared, clean)
    assert not list(shared.rglob("_progress")) and not list(shared.rglob("*.tmp-*"))
    assert not [p for p in shared.rglob("_leases/*") if p.is_file()]
