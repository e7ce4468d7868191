"""Regenerate gen/ from proto/ with grpcio-tools: `python tools/gen_proto.py [OUT_DIR]`."""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def _include_dir(module: str) -> str:
    # google/api/*.proto ship with googleapis-common-protos beside their _pb2 modules.
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent.parent.parent)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{_include_dir('google.api.annotations_pb2')}",
        f"-I{Path(str(resources.files('grpc_tools'))) / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes modules, not packages: mark each generated folder as a package.
    for proto in protos:
        folder = out_dir / Path(proto).parent
        while folder != out_dir:
            (folder / "__init__.py").touch()
            folder = folder.parent


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gen")
