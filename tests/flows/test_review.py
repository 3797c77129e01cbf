"""`editforge review` and `editforge calibrate-filter` on a small world run (the `world` preset's models, 8
captions, every rendered pair's images stored): the page in Chromium, its guard, labels on an object store,
the calibration on the world's own truth and the re-selection it suggests."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import threading
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from flows.review import ReviewServer, prepare
from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import load_config

pytestmark = pytest.mark.flow

ROOT = Path(__file__).resolve().parents[2]
KEYMAP = {
    "1": "good",
    "g": "good",
    "2": "wrong",
    "w": "wrong",
    "3": "broken",
    "b": "broken",
    "4": "unsure",
    "u": "unsure",
}


def run_stages(cfg, names=("captions", "finetune", "text", "render", "filter")) -> None:
    """The stages' own entries, no Prefect (as tests/infra/test_object_store.py runs them)."""
    for name in names:
        registry.prepare(cfg, name)
        done = [registry.entry(name)(cfg, pid) for pid in registry.partition_ids(cfg, name)]
        registry.finalize(cfg, name, done)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tests/flows/test_world_demo.py's run, smaller (8 captions, one partition), with every pair's images."""
    root = tmp_path_factory.mktemp("review-world")
    overrides = [
        f"output_root={root}",
        "name=reviewtest",
        "captions.num_captions=8",
        "captions.num_partitions=1",
        "text.finetune_steps=20",
        "render.save_images=all",
    ]
    cfg = load_config("world", overrides)
    run_stages(cfg)
    return cfg, overrides


def _bench():
    spec = importlib.util.spec_from_file_location("bench_review_world", ROOT / "bench" / "review_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels(cfg) -> pd.DataFrame:
    from tasks.filter.labels import LabelStore

    return LabelStore(layout.labels_dir(cfg.output_root, registry.stage_hash(cfg, "render"))).read()


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """A raw request: the path goes on the wire as written (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in {"Host": f"127.0.0.1:{port}", **(headers or {})}.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_review_page_labels_by_keyboard_persist_and_two_reviewers_keep_theirs(world):
    from playwright.sync_api import sync_playwright

    from flows.browser import chromium

    cfg, _ = world
    state = prepare(cfg)
    items = state.items
    assert len(items) > 25 and {i["stratum"] for i in items} >= {"kept", "far"}
    keys = [
        "1",
        "2",
        "3",
        "4",
        "g",
        "w",
        "b",
        "u",
        "1",
        "1",
        "2",
        "2",
        "g",
        "g",
        "w",
        "3",
        "4",
        "1",
        "2",
        "1",
    ]

    def saved(page, n: int) -> None:  # selectors, not a script: the page's CSP forbids eval
        page.wait_for_selector("#saving[data-pending='0']")
        mine, message = page.get_attribute("#progress", "data-mine"), page.inner_text("#message")
        assert mine == str(n), f"{mine} of {n} labels saved; the page says: {message!r}"

    with ReviewServer(state) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            alice = browser.new_context()
            alice.add_init_script("localStorage.setItem('editforge-review-reviewer', 'alice')")
            page = alice.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            assert (
                page.get_attribute("#pair", "data-key") == f"{items[0]['partition']}/{items[0]['sample_key']}"
            )
            assert items[0]["edit"] in page.inner_text("#instruction")
            # the next pairs' images were fetched while the first was shown
            page.wait_for_selector("#pair[data-preloaded='6']")
            fetched = page.evaluate(
                "performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)"
            )
            assert {items[1]["before"], items[1]["after"], items[3]["after"]} <= set(fetched)
            for key in keys:
                page.keyboard.press(key)
            saved(page, 20)
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            assert page.get_attribute("#progress", "data-mine") == "20"
            assert page.inner_text("#progress").startswith(f"pair 21 of {len(items)}")  # the first unlabelled
            page.keyboard.press("ArrowLeft")
            assert page.inner_text("#current") == "your label: good edit"  # pair 20's, pressed "1"

            bob = browser.new_context()
            bob.add_init_script("localStorage.setItem('editforge-review-reviewer', 'bob')")
            page_b = bob.new_page()
            page_b.goto(server.url)
            page_b.wait_for_selector("body[data-ready='1']")
            assert "others: alice 20" in page_b.inner_text("#progress")
            for _ in range(5):
                page_b.keyboard.press("w")
            saved(page_b, 5)
            page_b.screenshot(path=str(Path(cfg.output_root) / "review-page.png"))
        finally:
            browser.close()
    labels = pd.read_parquet(layout.labels_dir(cfg.output_root, registry.stage_hash(cfg, "render")))
    by = {r: g for r, g in labels.groupby("reviewer")}
    assert set(by) == {"alice", "bob"}
    assert dict(zip(by["alice"]["sample_key"], by["alice"]["label"])) == {
        i["sample_key"]: KEYMAP[k] for i, k in zip(items, keys)
    }
    assert dict(zip(by["bob"]["sample_key"], by["bob"]["label"])) == {
        i["sample_key"]: "wrong" for i in items[:5]
    }
    assert (labels["render_hash"] == registry.stage_hash(cfg, "render")).all()
    assert labels["pair_sha256"].notna().all() and labels["weight"].ge(1).all()
    assert (Path(cfg.output_root) / "review-page.png").stat().st_size > 10_000


TRAVERSALS = [
    "/img/0/../../_SUCCESS.json",
    "/img/0/..%2F..%2F_SUCCESS.json/input",
    "/img/0/%2e%2e/%2e%2e/samples.parquet",
    "/img/0/%2e%2e%2f%2e%2e%2fsamples.parquet/input",
    "/img/0/..%5c..%5csamples.parquet/input",
    "/static/../review.py",
    "/static/%2e%2e%2freview.py",
    "/static/..%2F..%2Fcli.py",
    "/static/",
    "/../../../etc/passwd",
    "//etc/passwd",
    "/img/0/images/x/input",
    "/img/00/{key}/input",
    "/img/0/{key}/samples",
    "/img/0/{key}%2F..%2F..%2F_SUCCESS.json/input",
    "/img/1/{key}/input",
    "/img/0/{key}_input.png",
]


def test_the_server_refuses_paths_outside_the_run_and_leaves_labels_untouched_by_bad_ones(world):
    cfg, _ = world
    state = prepare(cfg)
    item = state.items[0]
    folder = layout.partition_dir(cfg.output_root, "render", state.render_hash, 0)
    secret = Path(folder) / layout.SAMPLES_FILE
    assert secret.exists()
    absolute = [
        quote(str(secret)),
        "/img/0/" + quote(str(secret), safe="") + "/input",
        "/img/0/" + quote(str(Path(folder) / "images"), safe="") + "/input",
        str(secret),
    ]
    with ReviewServer(state) as server:
        status, headers, body = _request(server.port, "GET", item["before"])
        assert status == 200 and body[:4] == b"\x89PNG" and headers["content-type"] == "image/png"
        assert "default-src 'none'" in headers["content-security-policy"]
        for path in [p.format(key=item["sample_key"]) for p in TRAVERSALS] + absolute:
            status, _, body = _request(server.port, "GET", path)
            assert status in (400, 404), (path, status)
            assert b"PAR1" not in body and b"config_hash" not in body and b"import " not in body, path

        def post(body: bytes, kind: str = "application/json", **headers):
            return _request(server.port, "POST", "/api/labels", body, {"Content-Type": kind, **headers})[0]

        good = {
            "partition": 0,
            "sample_key": item["sample_key"],
            "label": "good",
            "reviewer": "alice",
            "session": "test-session-1",
        }
        assert post(json.dumps(good).encode()) == 200
        labels_dir = layout.labels_dir(cfg.output_root, state.render_hash)

        def snapshot():
            return {
                name: hashlib.sha256((Path(labels_dir) / name).read_bytes()).hexdigest()
                for name in sorted(os.listdir(labels_dir))
            }

        before = snapshot()
        bad = [
            b"not json",
            b"{",
            json.dumps([good]).encode(),
            json.dumps({**good, "label": "meh"}).encode(),
            json.dumps({**good, "partition": "0"}).encode(),
            json.dumps({**good, "extra": 1}).encode(),
            json.dumps({**good, "reviewer": "../../x"}).encode(),
            json.dumps({**good, "session": "x"}).encode(),
            json.dumps({**good, "sample_key": "../../_SUCCESS"}).encode(),
            json.dumps({**good, "pair_sha256": "0" * 64}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "label"}).encode(),
            json.dumps({**good, "reviewer": "a" * 5000}).encode(),
            b"\xff\xfe",
        ]
        for body in bad:
            assert post(body) in (400, 413), body[:60]
        assert post(json.dumps(good).encode(), kind="text/plain") == 415
        assert post(json.dumps(good).encode(), Origin="http://evil.example") == 403
        assert _request(server.port, "GET", "/", headers={"Host": "evil.example"})[0] == 421  # DNS rebinding
        assert snapshot() == before  # not a byte of the labels changed
        assert post(json.dumps({**good, "label": "wrong"}).encode()) == 200
        assert snapshot() != before


def test_beyond_loopback_the_page_needs_its_token(world):
    cfg, _ = world
    state = prepare(cfg, token="s3cret-token", host="0.0.0.0")
    assert state.allowed_hosts is None
    assert (
        prepare(cfg).allowed_hosts is not None and prepare(cfg).token is None
    )  # loopback: no token by default
    with ReviewServer(state) as server:  # served on loopback here, guarded as if bound to 0.0.0.0
        port = server.port
        image = state.items[0]["before"]
        assert _request(port, "GET", "/")[0] == 401
        assert _request(port, "GET", image)[0] == 401
        assert _request(port, "GET", "/?token=wrong")[0] == 401
        status, headers, _ = _request(port, "GET", "/?token=s3cret-token")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        assert _request(port, "GET", "/", headers={"Cookie": cookie})[0] == 200
        assert _request(port, "GET", image, headers={"X-Review-Token": "s3cret-token"})[0] == 200
        assert _request(port, "GET", "/api/queue", headers={"X-Review-Token": "nope"})[0] == 401


def test_review_and_calibration_on_an_object_store(world, s3):
    from flows.calibrate_filter import calibrate
    from tasks.filter.labels import LabelStore, check_label

    cfg, overrides = world
    root = "s3://editforge-test/run"
    for stage in ("captions", "render"):  # what review reads: the ledger (partitions) and the render version
        s3.put(str(Path(cfg.output_root) / stage), f"editforge-test/run/{stage}", recursive=True)
    remote = load_config("world", [*overrides, f"output_root={root}"])
    state = prepare(remote)
    assert len(state.items) == len(prepare(cfg).items)
    item = state.items[0]
    with ReviewServer(state) as server:
        status, _, body = _request(server.port, "GET", item["after"])
        assert status == 200 and body[:4] == b"\x89PNG"
        label = {
            "partition": 0,
            "sample_key": item["sample_key"],
            "label": "good",
            "reviewer": "alice",
            "session": "s3-session-1",
        }
        assert (
            _request(
                server.port,
                "POST",
                "/api/labels",
                json.dumps(label).encode(),
                {"Content-Type": "application/json"},
            )[0]
            == 200
        )
    # two more servers' stores appending at once, parts of 3 rows: nothing lost
    stores = [LabelStore(state.store.folder, chunk_rows=3) for _ in range(2)]
    start = threading.Barrier(2)

    def label_all(store, reviewer):
        start.wait()
        for it in state.items[:10]:
            store.append(
                [
                    check_label(
                        {
                            "partition": 0,
                            "sample_key": it["sample_key"],
                            "label": "wrong",
                            "reviewer": reviewer,
                            "session": f"{reviewer}-session",
                        },
                        state.known,
                    )
                ]
            )

    threads = [threading.Thread(target=label_all, args=(s, r)) for s, r in zip(stores, ("bob", "carol"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = LabelStore(state.store.folder).read()
    assert read.groupby("reviewer").size().to_dict() == {"alice": 1, "bob": 10, "carol": 10}
    assert state.store.folder.startswith(f"{root}/review/{state.render_hash}/labels.parquet")
    assert s3.glob(f"editforge-test/run/review/{state.render_hash}/labels.parquet/bob-*.parquet")
    result = calibrate(remote, target=0.5, min_passing=1)
    assert result["labels"]["pairs_decided"] == 10 and result["labels"]["reviewers"] == [
        "alice",
        "bob",
        "carol",
    ]


def test_calibrate_filter_on_the_world_truth_writes_an_override_that_reselects_without_rendering(
    world, tmp_path
):
    from typer.testing import CliRunner

    from flows.calibrate_filter import calibrate, report_section, summary_lines
    from flows.cli import app

    cfg, overrides = world
    truth = _bench().label_all(cfg)  # the world's own labels of every stored pair, through LabelStore
    assert set(truth["label"]) <= {"good", "wrong", "unsure"} and (truth["label"] == "good").sum() >= 5
    args = [
        "calibrate-filter",
        "--preset",
        "world",
        *(a for o in overrides for a in ("--set", o)),
        "--target-precision",
        "0.5",
        "--reviewer",
        "world-truth",
        "--json",
        str(tmp_path / "cal.json"),
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "cal.json").read_text())
    rules = {(r["set"], r["rule"]): r for r in result["rules"]}
    for which in ("paper", "current"):
        for rule in ("image-image", "caption (both images)", "direction", "CLIP (all three)"):
            r = rules[(which, rule)]
            assert r["labelled"] == len(truth[truth["label"] != "unsure"]) and 0 <= r["recall"] <= 1, (
                which,
                rule,
            )
    assert result["thresholds"]["paper"] == {
        "clip_image_threshold": 0.75,
        "clip_caption_threshold": 0.2,
        "clip_direction_threshold": 0.2,
    }
    assert set(result["roc"]) == {"clip_sim_dir", "clip_sim_image", "clip_caption_min"}
    review = layout.review_dir(cfg.output_root, registry.stage_hash(cfg, "render"))
    assert {"calibration.json", "people_vs_filter.png", "filter.set"} <= set(os.listdir(review))
    found = result["search"]["found"]
    assert found is not None and found["precision_low"] >= 0.5, result["search"]
    assert rules[("suggested", "CLIP (all three)")]["precision"] == pytest.approx(found["precision"])
    assert [c["held_out_half"] for c in result["cross_check"]] == [
        0,
        1,
    ]  # each half checks the other's choice
    lines = (Path(review) / "filter.set").read_text().split()
    assert lines[::2] == ["--set"] * 3 and lines[1::2] == result["set"]
    assert " ".join(lines) in out.output
    # the override re-selects from the stored scores: a new filter version, the same render (nothing rendered)
    render_before = storage.file_sizes(str(Path(cfg.output_root) / "render"))
    tuned = load_config("world", [*overrides, *result["set"]])
    assert registry.stage_hash(tuned, "render") == registry.stage_hash(cfg, "render")
    assert registry.stage_hash(tuned, "filter") != registry.stage_hash(cfg, "filter")
    run_stages(tuned, ("filter",))
    assert storage.file_sizes(str(Path(cfg.output_root) / "render")) == render_before
    kept = storage.read_parquet(registry.partition_url(tuned, "filter", 0) + "/" + layout.KEPT_FILE)
    assert len(kept) == result["reselection"]["suggested"]["kept"]
    # the report's section: every reviewer's labels, at the target of the last calibrate-filter
    section = report_section(cfg)
    everyone = calibrate(cfg, target=0.5)
    assert "People vs filter" in section["html"] and "data:image/png;base64," in section["html"]
    assert summary_lines(everyone)[0] in section["markdown"] and all(
        s in section["markdown"] for s in everyone["set"]
    )
    from flows import report_html

    page = Path(report_html.build(cfg)["html"]).read_text()
    assert "<h2 id='people'>People vs filter</h2>" in page and "alt='people'" in page
    # the labels as a held-out half would be passed in
    half = calibrate(cfg, _labels(cfg).iloc[::2], target=0.5, min_passing=1)
    assert half["labels"]["rows"] < result["labels"]["rows"]


def test_label_studio_export_and_import_round_trip(world, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, overrides = world
    base = ["--preset", "world", *(a for o in overrides for a in ("--set", o))]
    out = CliRunner().invoke(
        app, ["review", *base, "--export", "label-studio", "--out", str(tmp_path / "t.json")]
    )
    assert out.exit_code == 0, out.output
    tasks = json.loads((tmp_path / "t.json").read_text())
    config = (tmp_path / "t.xml").read_text()
    assert (
        len(tasks) == len(prepare(cfg).items) and '<Choice value="good"' in config and 'hotkey="1"' in config
    )
    first = tasks[0]["data"]
    assert first["before"].startswith("/data/local-files/?d=render/") and first["before"].endswith(
        "_input.png"
    )
    assert (Path(cfg.output_root) / first["before"].split("?d=", 1)[1]).exists()
    # Label Studio's export: the tasks with an annotation each
    exported = [
        {
            **t,
            "annotations": [
                {
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "after",
                            "type": "choices",
                            "value": {"choices": ["broken"]},
                        }
                    ]
                }
            ],
        }
        for t in tasks[:3]
    ]
    (tmp_path / "export.json").write_text(json.dumps(exported))
    out = CliRunner().invoke(
        app, ["review", *base, "--import-label-studio", str(tmp_path / "export.json"), "--reviewer", "dora"]
    )
    assert out.exit_code == 0 and "stored 3 labels of dora" in out.output, out.output
    dora = _labels(cfg).query("reviewer == 'dora'")
    assert sorted(dora["sample_key"]) == sorted(t["data"]["sample_key"] for t in tasks[:3])
    assert set(dora["label"]) == {"broken"}
    # a bad export is one error line, exit 2
    (tmp_path / "bad.json").write_text(
        json.dumps(
            [
                {
                    **tasks[0],
                    "data": {**tasks[0]["data"], "pair_sha256": "x"},
                    "annotations": exported[0]["annotations"],
                }
            ]
        )
    )
    out = CliRunner().invoke(app, ["review", *base, "--import-label-studio", str(tmp_path / "bad.json")])
    assert out.exit_code == 2 and "error:" in out.output and "images" in out.output


def test_bad_review_and_calibration_requests_are_one_error_line(world, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    _, overrides = world
    base = ["--preset", "world", *(a for o in overrides for a in ("--set", o))]
    empty = ["--preset", "world", "--set", f"output_root={tmp_path / 'nothing'}"]
    cases = [
        (["review", *base, "--reviewer", "../x"], "--reviewer"),
        (["review", *base, "--export", "fiftyone", "--out", str(tmp_path / "x.json")], "label-studio"),
        (["review", *base, "--export", "label-studio"], "--out"),
        (["review", *empty], "no render partition"),
        (["calibrate-filter", *empty], "no labels under"),
        (["calibrate-filter", *base, "--reviewer", "nobody"], "by nobody"),
        (["calibrate-filter", *base, "--target-precision", "1.5"], "--target-precision"),
    ]
    for args, expected in cases:
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2 and out.output.startswith("error:") and expected in out.output, (
            args,
            out.output,
        )
        assert "Traceback" not in out.output
