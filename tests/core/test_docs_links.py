"""The README and the docs/ pages hold together: every link and anchor between them leads somewhere,
every repository path they name exists, and every training option is documented."""

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:tests|docs|hypernetwork_ext|tools|benchmarks|scripts|javascript|\.ci)/[^`\s]*)`")


def prose(text: str) -> str:
    """The page without its code blocks and inline code spans (links there are not links)."""
    without_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"(`+).*?\1", "", without_blocks)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links():
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if not re.match(r"^[a-z]+:", target):  # http(s) and mailto are not followed offline
                yield page, target


@pytest.mark.parametrize(
    "page,target", list(links()), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v
)
def test_every_link_and_anchor_leads_somewhere(page, target):
    path, _sep, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.name}: {target} does not exist"
    if anchor:
        assert destination.suffix == ".md", f"{page.name}: {target} has an anchor into a non-page"
        assert anchor in anchors(destination), f"{page.name}: no heading of {destination.name} has the anchor #{anchor}"


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for page, target in links() if page.name == "README.md"}
    assert sorted(p.name for p in PAGES[1:] if p.resolve() not in linked) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(page):
    named = {path.rstrip(".,;:)/") for path in REPO_PATH.findall(page.read_text())}
    assert sorted(path for path in named if "<" not in path and not list(ROOT.glob(path))) == []


def test_every_training_option_is_in_the_option_tables():
    from hypernetwork_ext.training import TrainingConfig

    text = (ROOT / "docs" / "training.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`([a-z0-9_]+)`", "\n".join(rows)))
    names = {field.name for field in dataclasses.fields(TrainingConfig) if field.name != "hypernetwork_name"}
    missing = sorted(name for name in names if name not in documented and not name.startswith("preview_"))
    assert missing == []
    assert "`preview_from_txt2img` + `preview_*`" in text  # the preview_* fields' row
