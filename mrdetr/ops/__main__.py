"""``python -m mrdetr.ops build [--cuda]`` pre-builds the kernels; ``info`` shows the backends."""

from __future__ import annotations

import argparse
import sys

from . import _toolchain
from .backends import available_backends, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrdetr.ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the kernels into the build cache")
    p_build.add_argument("--cuda", action="store_true", help="also build the CUDA kernel")
    sub.add_parser("info", help="show which backends are available and why not")
    args = parser.parse_args(argv)
    if args.command == "build":
        results = build(cuda=args.cuda)
        failed = not all(st.available for st in results.values())
    else:
        root, how = _toolchain.find_cuda_home()
        print(f"CUDA toolkit: {root or 'none'} ({how})")
        print(f"CPU instruction set: {_toolchain.cpu_isa()[0]}")
        results, failed = available_backends(), False
    for name, st in results.items():
        print(f"{name:8s} {'available' if st.available else 'unavailable':12s} {st.reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
