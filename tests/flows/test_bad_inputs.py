"""Bad input, as a user gives it: each case gets one message naming the setting, file, line or field,
exit code 2, and no traceback (they are for `--debug`); nothing is retried, nothing is marked done.

Cases run through the `editforge` command line: config and command-line cases fail at load, before
Prefect starts; the others run the stage flow (under the Prefect test harness) and fail inside it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

CONFIG_CASES = [  # (--set, what the message says)
    ("render.stepz=3", "render.stepz: Extra inputs are not permitted"),
    ("bogus=1", "bogus: Extra inputs are not permitted"),
    ("render.steps=abc", "render.steps: Input should be a valid integer"),
    ("render.steps=0", "render.steps: Input should be greater than or equal to 1"),
    ("captions.num_partitions=0", "captions.num_partitions: Input should be greater than or equal to 1"),
    ("captions.num_captions=-5", "captions.num_captions: Input should be greater than or equal to 1"),
    ("render.keep.top_k=0", "render.keep.top_k: Input should be greater than or equal to 1"),
    (
        "render.keep.clip_image_threshold=1.5",
        "render.keep.clip_image_threshold: Input should be less than or equal to 1",
    ),
    (
        "render.keep.clip_caption_threshold=-3",
        "render.keep.clip_caption_threshold: Input should be greater than or equal to -1",
    ),
    (
        "filter.clip_direction_threshold=-7",
        "filter.clip_direction_threshold: Input should be greater than or equal to -1",
    ),
    ("filter.top_k=0", "filter.top_k: Input should be greater than or equal to 1"),
    ("render.p_range=[-0.5, 1.7]", "p_range [-0.5, 1.7]: p is the share of steps"),
    ("render.p_range=[0.9, 0.1]", "p_range: lower bound 0.9 is above upper bound 0.1"),
    ("render.cfg_range=[0.5, 2]", "cfg_range [0.5, 2.0]: classifier-free guidance scales start at 1"),
    ("render.height=60", "render.height: Input should be a multiple of 8"),
    ("render.width=4", "render.width: Input should be a multiple of 8"),
    ("train.resolution=66", "train.resolution: Input should be a multiple of 8"),
    ("render.scheduler=eulr", "render.scheduler: Input should be 'euler_ancestral'"),
    ("render.device=gpu", "render.device: Value error, unknown device 'gpu'"),
    ("text.device=cuda0", "text.device: Value error, unknown device 'cuda0'"),
    ("train.device=tpu", "train.device: Value error, unknown device 'tpu'"),
    ("render.dtype=fp8", "render.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ("render.batch_samples=0", "batch_samples must be >= 1 or 'auto'"),
    ("render.batch_samples=lots", "render.batch_samples"),
    ("render.early_reject.at=1.5", "render.early_reject.at: Input should be less than 1"),
    (
        "render.adaptive=true",
        "error: override 'render.adaptive': render.adaptive is now render.adaptive.enabled",
    ),
    (
        "render.round_size=4",
        "error: override 'render.round_size': render.round_size is now render.adaptive.round_size",
    ),
    ("render.early_reject_at=0.4", "render.early_reject_at is now render.early_reject.at"),
    (
        "render.early_reject_metrics=[clip_sim_dir]",
        "render.early_reject_metrics is now render.early_reject.metrics",
    ),
    ("render.save_images=some", "render.save_images: Input should be 'kept', 'passed' or 'all'"),
    ("render.attention=magic", "render.attention: Input should be 'ip2p'"),
    ("text.backend=gpt", "text.backend: Input should be 'local' or 'openai'"),
    ("text.temperature=-1", "text.temperature: Input should be greater than or equal to 0"),
    ("text.top_p=2", "text.top_p: Input should be less than or equal to 1"),
    ("text.val_fraction=1", "text.val_fraction: Input should be less than 1"),
    ("text.openai.mode=offline", "text.openai.mode: Input should be 'online' or 'batch'"),
    ("text.openai.concurrency=0", "text.openai.concurrency: Input should be greater than or equal to 1"),
    ("pack.image_format=gif", "pack.image_format: Input should be 'jpg', 'png' or 'webp'"),
    ("pack.quality=0", "pack.quality: Input should be greater than or equal to 1"),
    ("pack.shard_max_samples=0", "pack.shard_max_samples: Input should be greater than or equal to 1"),
    ("train.lr_warmup_steps=10", "lr_warmup_steps > 0 needs lr_scheduler"),
    ("train.conditioning_dropout=0.5", "train.conditioning_dropout: Input should be less than or equal to"),
    (
        "models.diffusion=sd99",
        "models.diffusion: Input should be 'tiny', 'sd15', 'sdxl', 'sd15-arch', 'tiny-sdxl', 'sdxl-turbo' or 'world' (got 'sd99')",
    ),
    ("name=my_run", "name: Value error, 'my_run' is not a valid run name"),
    ("name=Run", "name: Value error, 'Run' is not a valid run name"),
    ("verify=md5", "verify: Input should be 'size' or 'sha256'"),
    ("render.steps", "override 'render.steps': expected KEY=VALUE"),
    ("render.steps.x=1", "override 'render.steps.x': 'steps' is not a section"),
    ("=5", "override '=5': no key before '='"),
    ("render..steps=5", "override 'render..steps=5': 'render..steps' has an empty part between dots"),
    ("render.steps=[1,", "override 'render.steps': invalid YAML"),
    ("render.steps=!!python/object:os.system", "override 'render.steps': invalid YAML"),
    ("output_root=", "output_root: Value error, output_root is empty"),
    ("judges.vlm.prices=&a {x: *a}", "override 'judges.vlm.prices': YAML refused: a recursive alias"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_setting_fails_at_load_with_one_message(override, message):
    result = runner.invoke(app, ["config", "--set", override])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.yaml").write_text("render:\n  steps: [1, 2\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "flat.yaml").write_text(
        "render:\n  steps: 4\n  give_up_after: 32\n"
    )  # a saver's key before nesting
    return {"broken": folder / "broken.yaml", "list": folder / "list.yaml", "flat": folder / "flat.yaml"}


@pytest.mark.parametrize(
    "preset, message",
    [
        ("nope", "unknown preset 'nope': expected one of"),
        ("broken", "broken.yaml: invalid YAML"),
        ("list", "list.yaml: expected a mapping of sections"),
        ("flat", "flat.yaml: render.give_up_after is now render.adaptive.give_up_after"),
    ],
)
def test_a_bad_preset_fails_at_load_with_one_message(tmp_path, preset, message):
    files = _bad_files(tmp_path)
    result = runner.invoke(app, ["config", "--preset", str(files.get(preset, preset))])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["stage", "render", "--partitions", "5-2"], "the range 5-2 ends before it starts"),
        (["stage", "render", "--partitions", "x"], "expected partition ids and ranges"),
        (["stage", "render", "--partitions", "-1"], "expected partition ids and ranges"),
        (["stage", "render", "--partitions", "0,9"], "render: partitions [9] out of range 0..1"),
        (["stage", "finetune", "--partitions", "1"], "finetune: partitions [1] out of range 0..0"),
        (["stage", "rendr"], "unknown stage 'rendr'; expected one of captions, finetune"),
        (["stage", "train"], "unknown stage 'train' (the training flow: editforge train)"),
        (["run", "--verbose"], "No such option: --verbose"),
    ],
)
def test_a_bad_command_line_fails_before_any_work(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--set", f"output_root={tmp_path / 'run'}"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _seeds(folder: Path, name: str, *lines: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


GOOD = json.dumps({"input": "a red barn", "edit": "make it snowy", "output": "a red barn in the snow"})


def _run_cases(root: Path) -> list[tuple[str, list[str], str]]:
    """(case, arguments, message) of the cases that fail inside a stage flow."""
    data = root / "inputs"
    data.mkdir(parents=True)
    (data / "not.parquet").write_text("just text")
    no_text = _parquet(data / "no-text.parquet", URL=["https://x/1.jpg"], CAPTION=["a cat"])
    out = root / "out"
    cases = [
        (
            "caption source missing",
            ["stage", "captions", "--set", f"captions.source={data}/missing.parquet"],
            f"{data}/missing.parquet: file not found",
        ),
        (
            "caption glob matching nothing",
            ["stage", "captions", "--set", f"captions.source={data}/none-*.parquet"],
            "matched no file",
        ),
        (
            "caption source not parquet",
            ["stage", "captions", "--set", f"captions.source={data}/not.parquet"],
            f"{data}/not.parquet: not a readable parquet file",
        ),
        (
            "caption source without TEXT",
            ["stage", "captions", "--set", f"captions.source={no_text}"],
            "missing required column 'TEXT'",
        ),
    ]
    seed_cases = {
        "seed file missing": (None, "no such file"),
        "seeds: invalid JSON": (
            _seeds(data, "json.jsonl", GOOD, '{"input": "a"'),
            "json.jsonl line 2: invalid JSON",
        ),
        "seeds: not an object": (
            _seeds(data, "list.jsonl", '["a", "b", "c"]'),
            "list.jsonl line 1: expected a JSON object",
        ),
        "seeds: missing field": (
            _seeds(data, "field.jsonl", '{"input": "a cat", "output": "a dog"}'),
            "field.jsonl line 1: field 'edit': Field required",
        ),
        "seeds: empty field": (
            _seeds(data, "empty.jsonl", '{"input": "a cat", "edit": " ", "output": "a dog"}'),
            "empty.jsonl line 1: field 'edit': String should have at least 1",
        ),
        "seeds: output equals input": (
            _seeds(data, "same.jsonl", '{"input": "A cat.", "edit": "e", "output": "a cat"}'),
            "same.jsonl line 1: field 'output': output caption equals the input",
        ),
        "seeds: line break": (
            _seeds(data, "nl.jsonl", '{"input": "a cat", "edit": "e\\n##\\nx", "output": "a dog"}'),
            "nl.jsonl line 1: field 'edit': contains a line break",
        ),
        "seeds: separator": (
            _seeds(data, "sep.jsonl", '{"input": "a cat", "edit": "e", "output": "a %% dog"}'),
            "sep.jsonl line 1: field 'output': contains '%%'",
        ),
        "seeds: repeated": (
            _seeds(data, "dup.jsonl", GOOD, GOOD),
            "dup.jsonl line 2: the same input and edit as line 1",
        ),
        "seeds: not UTF-8": (
            _seeds(
                data, "latin.jsonl", '{"input": "caf\xe9", "edit": "e", "output": "tea"}'.encode("latin-1")
            ),
            "latin.jsonl line 1: not UTF-8 text",
        ),
        "seeds: no triplets": (_seeds(data, "blank.jsonl", "", "  "), "blank.jsonl: contains no triplets"),
        "seeds: both input and caption": (
            _seeds(data, "alias.jsonl", '{"input": "a", "caption": "b", "edit": "e", "output": "c"}'),
            "alias.jsonl line 1: field 'caption': give either 'input'",
        ),
        "seeds: a JSON array": (
            _seeds(data, "array.jsonl", "[" + GOOD + ",", GOOD.replace("snowy", "rainy") + "]"),
            ("array.jsonl line 1: invalid JSON", "seed annotations are JSON Lines: one"),
        ),
        "seeds: a 4.8 MB line": (
            _seeds(
                data, "long.jsonl", GOOD, json.dumps({"input": "x" * 4_800_000, "edit": "e", "output": "y"})
            ),
            "long.jsonl: 1 line(s) longer than 16,384 bytes, refused: line 2 (4,800,",
        ),
    }
    for case, (path, message) in seed_cases.items():
        target = path or data / "missing-seeds.jsonl"
        cases.append(
            (
                case,
                ["config", "--set", f"text.seed_annotations={target}"]
                if path is None
                else ["stage", "finetune", "--set", f"text.seed_annotations={target}"],
                message,
            )
        )
    cases += [
        (
            "LM path missing",
            ["stage", "finetune", "--set", "models.lm=some-org/lm", "--set", "models.lm_path=/no/such/lm"],
            "models.lm_path=/no/such/lm does not exist",
        ),
        (
            "text before captions",
            ["stage", "text"],
            "text part-00000 needs captions part-00000 to be finished first",
        ),
        (
            "render before text",
            ["stage", "render"],
            "render part-00000 needs text part-00000 to be finished first",
        ),
        (
            "filter before render",
            ["stage", "filter"],
            "needs render part-0000",
        ),  # whichever partition fails first
        ("pack before filter", ["stage", "pack"], "needs filter part-0000"),
        ("train without shards", ["train"], "no shard index at"),
        (
            "openai key not set",
            [
                "stage",
                "finetune",
                "--set",
                "text.backend=openai",
                "--set",
                "text.openai.api_key_env=EDITFORGE_UNSET_KEY",
            ],
            "EDITFORGE_UNSET_KEY is not set",
        ),
    ]
    return [(case, [*args, "--set", f"output_root={out}"], message) for case, args, message in cases]


@pytest.mark.flow
def test_bad_inputs_inside_a_run_give_one_message_exit_2_and_no_traceback(
    prefect_harness, tmp_path, monkeypatch
):
    monkeypatch.delenv("EDITFORGE_UNSET_KEY", raising=False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addHandler(keep)
    failures = []
    try:
        for case, args, message in _run_cases(tmp_path):
            before = len(records)
            result = runner.invoke(app, args)
            logged = "\n".join(
                keep.format(r) + (f"\n{r.exc_text}" if r.exc_text else "") for r in records[before:]
            )
            retried = any(
                "Retry" in r.getMessage() and "will start" in r.getMessage() for r in records[before:]
            )
            messages = message if isinstance(message, tuple) else (message,)
            if (
                result.exit_code != 2
                or any(m not in result.output for m in messages)
                or "Traceback" in result.output + logged
                or any(r.exc_info for r in records[before:])
                or retried
            ):
                failures.append(f"{case}: exit {result.exit_code}, retried={retried}\n{result.output[-800:]}")
    finally:
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).removeHandler(keep)
    assert not failures, "\n\n".join(failures)
    assert not list((tmp_path / "out").rglob("_SUCCESS.json"))  # nothing was marked done


@pytest.mark.integration
def test_the_module_commands_fail_the_same_way_without_a_traceback(tmp_path):
    """`python -m flows.generate` / `flows.train`: the same message and code, as a user's shell sees them."""
    for module, args, message in (
        ("flows.generate", ["--set", "render.keep.top_k=0"], "render.keep.top_k"),
        ("flows.train", ["--set", f"output_root={tmp_path}"], "no shard index at"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**__import__("os").environ, "PREFECT_HOME": str(tmp_path / "home")},
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stdout + proc.stderr


def test_the_table_has_sixty_cases(tmp_path):
    count = len(CONFIG_CASES) + 3 + 8 + len(_run_cases(tmp_path))
    assert count >= 60, count
    assert pd.Series([c[0] for c in CONFIG_CASES]).is_unique


# The edges (issue 25; docs/reliability.md "Bad input at the edges"): one test per case, each through the CLI
# as a user meets it and, where a deployment's worker meets it without the CLI, through the stage too.


def _nine(name: str, item: str) -> str:
    return f"{name}: &{name} [{', '.join([item] * 9)}]"


# 9 levels of 9 aliases: about 600 bytes, 9**9 (387 million) values once expanded
ALIAS_BOMB = "\n".join([_nine("l0", '"lol"'), *(_nine(f"l{i}", f"*l{i - 1}") for i in range(1, 9))]) + "\n"


def test_an_empty_output_root_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from tasks.common.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["stage", "captions", "--set", "output_root="])
    assert result.exit_code == 2 and "output_root: Value error, output_root is empty" in result.output, (
        result.output
    )
    assert not list(tmp_path.iterdir())
    with pytest.raises(
        ConfigError, match="output_root is empty"
    ):  # a deployment's flow loads it the same way
        load_config("demo", ["output_root=   "])


def test_a_yaml_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    import tracemalloc

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    inline = "{" + ", ".join(ALIAS_BOMB.splitlines()) + "}"
    tracemalloc.start()
    try:
        results = [
            runner.invoke(app, ["config", "--preset", str(bomb)]),
            runner.invoke(app, ["config", "--set", f"judges.vlm.prices={inline}"]),
        ]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for result, where in zip(
        results, (f"{bomb}: YAML refused", "override 'judges.vlm.prices': YAML refused")
    ):
        assert result.exit_code == 2 and where in result.output and "once its aliases" in result.output, (
            result.output
        )
    assert peak < 64 * 2**20, peak  # nothing was expanded


def test_an_output_root_that_is_a_file_names_the_setting(tmp_path):
    a_file = tmp_path / "run"
    a_file.write_text("not a folder")
    for root, what in ((a_file, "is a file"), (a_file / "below", f"is under {a_file}, which is a file")):
        result = runner.invoke(app, ["stage", "captions", "--set", f"output_root={root}"])
        assert result.exit_code == 2 and f"output_root {root} {what}, not a folder" in result.output, (
            result.output
        )
    assert a_file.read_text() == "not a folder"


def test_a_read_only_root_and_a_full_disk_name_the_path_exit_2_and_mark_nothing(tmp_path):
    """In a private mount namespace: a read-only tmpfs and one filled to the last byte (tests/flows/disk_faults.py)."""
    import shutil

    if (
        not shutil.which("unshare")
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode
    ):
        pytest.skip("needs a private mount namespace (unshare -rm: util-linux, user namespaces)")
    (tmp_path / "full").mkdir()
    (tmp_path / "ro").mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {tmp_path}/full && mount -t tmpfs -o ro tmpfs {tmp_path}/ro && "
        f"exec {sys.executable} {ROOT}/tests/flows/disk_faults.py {tmp_path}"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    at_load = got["read-only root, at load"]
    assert (
        at_load["exit"] == 2
        and f"output_root {tmp_path}/ro/run" in at_load["output"]
        and "is on a read-only file system" in at_load["output"]
    ), at_load
    full = got["disk full, a command's write"]
    assert (
        full["exit"] == 2
        and f"cannot write {tmp_path}/full/run/pack/" in full["output"]
        and "no space left on the device" in full["output"]
    ), full
    for case, where, what in (
        ("read-only root, a stage's write", f"{tmp_path}/ro/run/captions/", "read-only file system"),
        ("disk full, a stage's write", f"{tmp_path}/full/stage/captions/", "no space left"),
    ):
        failed = got[case]
        assert failed["type"] == "WriteError" and failed["permanent"], failed  # permanent: never retried
        assert failed["error"].startswith(f"cannot write {where}") and what in failed["error"], failed
    assert got["markers"] == []


def test_a_missing_bucket_names_the_bucket_and_the_setting(s3):
    from tasks import registry
    from tasks.common.config import load_config
    from tasks.common.errors import is_permanent
    from tasks.common.storage import WriteError

    s3.mkdir("have")
    result = runner.invoke(app, ["stage", "captions", "--set", "output_root=s3://no-such-bucket/run"])
    assert result.exit_code == 2, result.output
    assert "output_root s3://no-such-bucket/run: the bucket 'no-such-bucket' does not exist" in result.output
    verify = runner.invoke(app, ["verify", "--set", "output_root=s3://have/never"])
    assert verify.exit_code == 2 and "no run at output_root s3://have/never" in verify.output, verify.output
    # a deployment's worker (no CLI check): the first write names them, is not retried, creates no bucket
    cfg = load_config("demo", ["output_root=s3://no-such-bucket/run"])
    with pytest.raises(
        WriteError, match="the bucket 'no-such-bucket' does not exist: create it, or set output_root"
    ) as err:
        registry.prepare(cfg, "captions")
    assert is_permanent(err.value) and not s3.exists("no-such-bucket")


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf"])
def test_a_bad_lease_ttl_names_the_variable(tmp_path, monkeypatch, value):
    from tasks import registry
    from tasks.common.config import load_config
    from tasks.common.errors import is_permanent

    monkeypatch.setenv("EDITFORGE_LEASE_TTL_S", value)
    result = runner.invoke(app, ["stage", "captions", "--set", f"output_root={tmp_path / 'run'}"])
    assert (
        result.exit_code == 2
        and f"EDITFORGE_LEASE_TTL_S={value!r}: expected a positive number of seconds" in result.output
    ), result.output
    with pytest.raises(
        ValueError, match="EDITFORGE_LEASE_TTL_S"
    ) as err:  # a worker's environment: same error
        registry.prepare(load_config("demo", [f"output_root={tmp_path / 'run'}"]), "captions")
    assert is_permanent(err.value) and not (tmp_path / "run").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, size, message",
    [
        ("tiny.png", (1, 1), "1x1 pixels is too small to edit: at least 8x8"),
        (
            "huge.png",
            (20000, 20000),
            "20000x20000 pixels (400 megapixels by its header) is larger than editforge edit takes",
        ),
    ],
)
def test_edit_names_an_image_too_small_or_too_large_by_its_header(tmp_path, name, size, message):
    from PIL import Image

    path = tmp_path / name
    if max(size) > 100:
        path.write_bytes(_png_header(*size))
    else:
        Image.new("RGB", size, (10, 200, 10)).save(path)
    result = runner.invoke(
        app, ["edit", str(path), "make it snowy", "--set", f"output_root={tmp_path / 'no-run'}"]
    )
    assert result.exit_code == 2 and f"error: {path}: {message}" in result.output, result.output
    assert "Traceback" not in result.output and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("command", ["verify", "report"])
def test_verify_and_report_on_a_missing_output_root_say_so(tmp_path, command):
    result = runner.invoke(app, [command, "--set", f"output_root={tmp_path / 'never-run'}"])
    assert result.exit_code == 2, result.output
    assert (
        f"error: no run at output_root {tmp_path / 'never-run'}: nothing has been written there"
        in result.output
    )
    assert "finished" not in result.output and not (tmp_path / "never-run").exists()  # no table of zeros
