"""pyproject.toml lists every package (an explicit list is what lets csrc/ ship as mrdetr._csrc)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mrdetr").rglob("__init__.py")
    }
    found |= {
        ".".join(("mrdetr", "_csrc", *d.relative_to(ROOT / "csrc").parts))
        for d in [ROOT / "csrc", *(ROOT / "csrc").rglob("*")]
        if d.is_dir()
    }
    assert listed == found
    assert config["package-dir"]["mrdetr._csrc"] == "csrc"
