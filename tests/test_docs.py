"""Every ```python block of README.md and docs/*.md runs.

The blocks of one file run in order in one namespace (like a notebook), so a page can build on
its earlier blocks. Illustrative fragments that are not meant to run use a ```text fence.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# optional extras a page's blocks import; the page is skipped without them
REQUIRES = {
    "demo.md": ("pycocotools", "matplotlib"),
    "deploy.md": ("onnx", "onnxscript", "onnxruntime"),
    "getting_started.md": ("transformers",),
    "integrations.md": ("transformers",),
}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    """The ```python blocks of ``page``, in order."""
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    for module in REQUIRES.get(page.name, ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # pages run from the repository root
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name} block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name}, python block {i} failed: {e!r}\n{code}") from e


def test_every_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"


def test_api_reference_is_current():
    """docs/api.md is what docs/gen_api.py renders now (every public name has a docstring)."""
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "api.md").read_text() == gen.render(), (
        "docs/api.md is out of date: run `python docs/gen_api.py`"
    )
