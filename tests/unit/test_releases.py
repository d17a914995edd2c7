"""The release's version is raised with its CHANGELOG entry, and each entry can be found in
the history (tags may not travel): its commit, or "this commit" for the one being made."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
RELEASE = re.compile(r"^## (\d+\.\d+\.\d+) \((this commit|commit ([0-9a-f]{7,40}))\)$", re.M)


def releases() -> list[re.Match]:
    return list(RELEASE.finditer((ROOT / "CHANGELOG.md").read_text()))


def test_the_changelog_top_entry_is_pyproject_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    found = releases()
    assert found, "CHANGELOG.md has no '## X.Y.Z (commit ...)' entry"
    assert found[0].group(1) == version, "raise pyproject's version with the CHANGELOG's new entry"


def test_every_release_names_its_commit_and_whether_it_upgrades_in_place():
    text = (ROOT / "CHANGELOG.md").read_text()
    found = releases()
    headings = re.findall(r"^## .*$", text, re.M)
    assert len(headings) == len(found), f"a release heading without its commit: {headings}"
    assert [m.group(2) == "this commit" for m in found].count(True) <= 1 and \
        all(m.group(3) for m in found[1:]), "only the newest release may say 'this commit'"
    versions = [tuple(map(int, m.group(1).split("."))) for m in found]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    for start, end in zip(found, found[1:] + [None]):
        entry = text[start.end():end.start() if end else len(text)]
        assert "Upgrades in place" in entry, f"{start.group(1)}: say whether it upgrades in place"


def test_each_named_commit_is_the_release_it_says():
    for release in releases()[1:]:
        version, commit = release.group(1), release.group(3)
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:pyproject.toml"],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, f"commit {commit} of {version}: {shown.stderr.strip()}"
        assert tomllib.loads(shown.stdout)["project"]["version"] == version
