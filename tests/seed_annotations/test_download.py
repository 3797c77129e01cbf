"""Tests for seed_annotations.download against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seed_annotations.download import PAPER_PROMPTS_URL, PromptDownloadError, download_paper_prompts, main
from seed_annotations.schema import SeedAnnotationError

ROWS = [
    {
        "input": "Photo of a lighthouse at dusk",
        "edit": "make it stormy",
        "output": "Photo of a lighthouse in a storm",
    },
    {"input": "Oil painting of a pear", "edit": "make it an apple", "output": "Oil painting of an apple"},
    {
        "input": "A bowl of ramen, 4k",
        "edit": "add chopsticks",
        "output": "A bowl of ramen with chopsticks, 4k",
    },
]
GOOD_BODY = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
PAGES: dict[str, bytes] = {
    "/human-written-prompts.jsonl": GOOD_BODY,
    # The released file may carry keys beyond input/edit/output: they are ignored.
    "/with-extra-keys.jsonl": (json.dumps({**ROWS[0], "url": "http://x/y.jpg"}) + "\n").encode(),
    "/malformed.jsonl": GOOD_BODY + b'{"input": "a cat", "edit": "", "output": "a dog"}\n',
}
SLOW_PATH = "/slow.jsonl"
RELEASE_SLOW = threading.Event()  # the slow page answers only when the server shuts down: never in time


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == SLOW_PATH:
            RELEASE_SLOW.wait()
        body = PAGES.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/jsonl")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RELEASE_SLOW.clear()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        RELEASE_SLOW.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_default_url_is_the_papers() -> None:
    assert PAPER_PROMPTS_URL == "http://instruct-pix2pix.eecs.berkeley.edu/human-written-prompts.jsonl"


def test_downloads_and_validates(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "new" / "folder" / "prompts.jsonl"
    path, count = download_paper_prompts(dest, url=f"{server}/human-written-prompts.jsonl", timeout=10)
    assert (path, count) == (dest, len(ROWS))
    assert dest.read_bytes() == GOOD_BODY
    assert leftovers(dest.parent) == []


def test_directory_destination_uses_the_url_file_name(server: str, tmp_path: Path) -> None:
    path, _ = download_paper_prompts(tmp_path, url=f"{server}/human-written-prompts.jsonl", timeout=10)
    assert path == tmp_path / "human-written-prompts.jsonl"
    assert path.read_bytes() == GOOD_BODY


def test_extra_keys_in_the_release_are_tolerated(server: str, tmp_path: Path) -> None:
    _, count = download_paper_prompts(tmp_path / "p.jsonl", url=f"{server}/with-extra-keys.jsonl", timeout=10)
    assert count == 1


def test_http_404_is_a_clear_error_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "p.jsonl"
    with pytest.raises(PromptDownloadError, match=r"/missing\.jsonl failed: HTTP 404"):
        download_paper_prompts(dest, url=f"{server}/missing.jsonl", timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_malformed_file_names_url_line_field_and_keeps_old_file(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "p.jsonl"
    dest.write_text("previous contents\n")
    url = f"{server}/malformed.jsonl"
    with pytest.raises(SeedAnnotationError, match=f"^{url} line {len(ROWS) + 1}: field 'edit'"):
        download_paper_prompts(dest, url=url, timeout=10)
    assert dest.read_text() == "previous contents\n"
    assert leftovers(tmp_path) == []


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PromptDownloadError, match=r"cannot reach .*network access"):
        download_paper_prompts(tmp_path / "p.jsonl", url=f"http://127.0.0.1:{port}/p.jsonl", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_timeout_is_a_clear_error(server: str, tmp_path: Path) -> None:
    with pytest.raises(PromptDownloadError, match="timed out"):
        download_paper_prompts(tmp_path / "p.jsonl", url=f"{server}{SLOW_PATH}", timeout=0.3)
    assert list(tmp_path.iterdir()) == []


def test_command_line(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "p.jsonl"
    assert main([str(dest), "--url", f"{server}/human-written-prompts.jsonl"]) == 0
    assert f"wrote {len(ROWS)} triplets to {dest}" in capsys.readouterr().out
    assert main([str(tmp_path / "q.jsonl"), "--url", f"{server}/missing.jsonl"]) == 1
    assert "error: downloading" in capsys.readouterr().err
