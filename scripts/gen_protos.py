"""Regenerate the committed Python code for protos/*.proto (run: make protos)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PACKAGE = "sigil_feed.protos"
"""The import path of the generated modules; messages register under it so that they pickle."""


def generate(proto_dir: Path, out_dir: Path) -> None:
    """Compile every .proto in proto_dir into out_dir with package-relative imports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in proto_dir.glob("*.proto"))
    args = ["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for grpc_file in out_dir.glob("*_pb2_grpc.py"):
        text = grpc_file.read_text()
        grpc_file.write_text(re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M))
    for message_file in out_dir.glob("*_pb2.py"):
        text = message_file.read_text()
        message_file.write_text(re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'(\w+_pb2)'",
                                       rf"\1'{PACKAGE}.\2'", text))


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "protos"
    generate(root, Path(sys.argv[1]) if len(sys.argv) > 1 else root)
