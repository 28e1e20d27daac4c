"""Every Python code block of README.md and docs/*.md runs, so the docs cannot drift from the code.

The blocks of one file run in order in one namespace, in an empty folder. Their placeholders are real things:
``name_or_path`` is stories260K (a real LLaMA); the folders ``path/or/hub-repo`` and ``dir`` hold its shipped
3-bit config and ``nuq3-1pct`` SmolLM2's; ``my-org/...`` repos live on the local Hub stand-in
(tests/hub/hub_server.py); ``load_model("smollm2")`` is the embedded default model itself.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.helpers import REPO, STORIES

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED = REPO / "hub_configs"
FOLDERS = {
    "path/or/hub-repo": SHIPPED / "stories260k" / "nuq3-1pct",
    "dir": SHIPPED / "stories260k" / "nuq3-1pct",
    "nuq3-1pct": SHIPPED / "smollm2-135m-instruct" / "nuq3-1pct",
}
HUB_REPOS = ["my-org/my-model"]  # existing repos the docs push into


def python_blocks(path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


WITH_CODE = [d for d in DOCS if python_blocks(d)]


def test_the_docs_have_python_blocks():
    """The extraction finds the blocks (a changed fence style would otherwise make the test below vacuous)."""
    names = {d.name for d in WITH_CODE}
    assert {"README.md", "usage.md", "hub.md", "format.md"} <= names
    assert sum(len(python_blocks(d)) for d in WITH_CODE) >= 8


@pytest.mark.parametrize("doc", WITH_CODE, ids=lambda d: d.name)
def test_python_blocks_run(doc, hub, tmp_path, monkeypatch):
    for name, source in FOLDERS.items():
        shutil.copytree(source, tmp_path / name)
    for repo in HUB_REPOS:
        hub.create_repo(repo)
    monkeypatch.chdir(tmp_path)
    namespace = {"name_or_path": str(STORIES)}
    for i, block in enumerate(python_blocks(doc)):
        exec(compile(block, f"{doc.name} python block {i + 1}", "exec"), namespace)
