"""Regenerate the committed gRPC/protobuf stubs from proto/slofleet/api/v1/*.proto.

Run with the project's venv python: `python proto/generate.py`. CI runs it and then
`git diff --exit-code` so that stubs never drift from their .proto files or get edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


def main() -> int:
    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slofleet/api/v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
