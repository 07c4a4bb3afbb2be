"""``import mrdetr`` stays light: no ``torch._dynamo`` (about 1 s) until something compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from mrdetr.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]


def test_import_mrdetr_does_not_import_dynamo():
    # mrdetr.adapters is not imported by `import mrdetr`; its wrap.py still applies
    # torch.compiler.disable at import (which imports torch._dynamo).
    code = (
        "import json, sys, mrdetr, mrdetr.ops, mrdetr.layers, mrdetr.adapters; "
        "print(json.dumps([mrdetr.__file__, 'torch._dynamo' in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, dynamo = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(path).resolve().parent == ROOT / "mrdetr"  # this checkout's package
    assert dynamo is False


def test_constant_marker_is_the_one_torch_sets():
    """_dispatch marks _resolve_backend itself; torch's decorator must set the same attribute."""

    def mine():
        return 0

    def torchs():
        return 0

    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(_dispatch._assume_constant_result(mine)) == vars(torchs)
    assert vars(_dispatch._resolve_backend) == vars(torchs)
