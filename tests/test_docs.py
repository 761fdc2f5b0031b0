"""The README's links resolve (the docs site's own links are checked by `make docs`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINKS = sorted(set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)))


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 200
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "no dated status in the README"


@pytest.mark.parametrize("link", [link for link in LINKS if "://" not in link])
def test_every_readme_link_resolves(link):
    assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in nav] == []
