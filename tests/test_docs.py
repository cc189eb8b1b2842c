"""The README and docs/ cannot point at what does not exist: every relative link (and its #anchor) resolves, and
nothing a user reads names a development-only folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    links = [link for link in LINK.findall(text) if not link.startswith(("http://", "https://", "mailto:"))]
    assert links or page.name != "README.md"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name} links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name} links to {link}: {target.name} has no such heading"


def test_no_user_facing_file_names_the_development_data_folder():
    readable = [*PAGES, *(ROOT / "configs").rglob("*.yaml"), *(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "lm_lightning").rglob("*.py")]
    named = [str(p.relative_to(ROOT)) for p in readable if "../shared" in p.read_text(encoding="utf-8")]
    assert named == []
