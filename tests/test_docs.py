"""The README a newcomer reads and the pages it sends them to (the site itself: `mkdocs build --strict` in make test)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _local_links(md: Path) -> list[str]:
    return [t for t in LINK.findall(md.read_text()) if "://" not in t]


def test_the_readme_is_short_and_every_file_it_links_exists():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    links = _local_links(readme)
    assert "docs/running.md" in links and "docs/cluster.md" in links and "HISTORY.md" in links
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_docs_page_is_in_the_site_nav_and_linked_from_the_index():
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (ROOT / "docs" / "index.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
    assert [p for p in pages if p != "index.md" and f"]({p})" not in index] == []
