"""Write docs/api.md, the API reference, from the docstrings of every public name.

Run ``python docs/gen_api.py`` after changing a public docstring; ``tests/test_docs.py`` fails
when docs/api.md is out of date or a public name has no docstring.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = (
    ("mrdetr", "Top-level names"),
    ("mrdetr.routes", "Routes and presets"),
    ("mrdetr.routing", "Routing engine"),
    ("mrdetr.layers", "Layers"),
    ("mrdetr.adapters", "Adapters for existing decoders"),
    ("mrdetr.matching", "Matchers"),
    ("mrdetr.criterion", "Criterion"),
    ("mrdetr.losses", "Losses"),
    ("mrdetr.boxes", "Box geometry"),
    ("mrdetr.nms", "Non-maximum suppression"),
    ("mrdetr.segmentation", "Instance segmentation"),
    ("mrdetr.convert", "Checkpoint conversion"),
    ("mrdetr.ops", "The deformable-attention op"),
    ("mrdetr.export", "Export"),
    ("mrdetr.profiling", "Counting operations and host reads"),
)
OUT = Path(__file__).resolve().parent / "api.md"


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _entry(module: str, name: str, obj) -> list[str]:
    """Markdown lines of one public name: heading, signature, docstring."""
    if inspect.ismodule(obj):
        return []  # submodules have their own section
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
    lines = [f"### `{module}.{name}`", ""]
    if kind == "constant":
        lines += ["```text", f"{name} = {obj!r}", "```", ""]
        return lines
    doc = inspect.getdoc(obj)
    if not doc:
        raise ValueError(f"{module}.{name} has no docstring")
    sig = _signature(obj.__init__ if kind == "class" and "__init__" in vars(obj) else obj)
    sig = sig.replace("(self, ", "(").replace("(self)", "()")
    lines += ["```text", f"{kind} {name}{sig}", "", doc, "```", ""]
    if kind == "class":
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not (
                inspect.isfunction(member) or isinstance(member, property)
            ):
                continue
            mdoc = inspect.getdoc(member)
            if mdoc:
                msig = "" if isinstance(member, property) else _signature(member)
                msig = msig.replace("(self, ", "(").replace("(self)", "()")
                lines += [f"#### `{name}.{attr}{msig}`", "", "```text", mdoc, "```", ""]
    return lines


def render() -> str:
    """The whole API reference as markdown."""
    out = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; every public name of every",
        "public module (its `__all__`). Concepts: [concepts.md](concepts.md); the other pages:",
        "[index.md](index.md).",
        "",
    ]
    seen: set[int] = set()
    for module, title in MODULES:
        mod = importlib.import_module(module)
        out += [f"## {title} (`{module}`)", ""]
        if mod.__doc__:
            out += [inspect.cleandoc(mod.__doc__).split("\n\n")[0], ""]
        for name in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, name)
            if module != "mrdetr" and id(obj) in seen and not isinstance(obj, (int, float, str)):
                out += [f"- `{module}.{name}`: see above.", ""]
                continue
            if module == "mrdetr" and not inspect.ismodule(obj):
                out += [f"- `mrdetr.{name}`: re-exported; documented in its module below.", ""]
                continue
            seen.add(id(obj))
            out += _entry(module, name, obj)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
