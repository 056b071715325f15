"""Regenerate the committed Python code for protos/*.proto (run: make protos).

The code is generated with the oldest toolchain that compiles feed.proto, so that the thin client's floors in
pyproject.toml can be as low as that code allows. grpcio-tools 1.55.3 (protoc 23.1) writes code with no
runtime version check; it is tested on protobuf 4.21.6 up to 7.x and grpcio 1.55.3 up to the current release
(.ci/run tests the client on the floors). grpcio-tools 1.54 and older refuse feed.proto (they reject the JSON
names of `steps` and `step_s` as conflicting); 1.64 and newer write a check that the installed grpcio is at
least the tools' version, and from 1.66 (protobuf 5.27) one that the protobuf runtime is at least theirs.

That grpcio-tools needs protobuf<5, which the server's libraries exclude, so it runs in a virtual environment
of its own, made on first use under the user's cache directory (this needs the package index once), unless the
running Python has it (.ci/run's client floor step installs it there: `gen_protos.py --requirements`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TOOLS_VERSION = "1.55.3"
TOOLS = f"grpcio-tools=={TOOLS_VERSION}"
"""The code generator; the grpcio floor in pyproject.toml is its version (gRPC's rule: grpcio >= grpcio-tools)."""

REQUIREMENTS = (TOOLS, "setuptools<81")
"""What the generator needs installed (setuptools: grpc_tools 1.55 imports pkg_resources, which setuptools 81
drops)."""

PACKAGE = "sigil_feed.protos"
"""The import path of the generated modules; messages register under it so that they pickle."""


def toolchain() -> Path:
    """A Python with TOOLS: this one if it has them, else a virtual environment created once per user (under
    $XDG_CACHE_HOME)."""
    try:
        if version("grpcio-tools") == TOOLS_VERSION:
            return Path(sys.executable)
    except PackageNotFoundError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sigil-feed-protoc"
    root = cache / TOOLS.replace("==", "-")
    python, ready = root / "bin" / "python", root / ".ready"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once make it once
        if ready.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        base = os.environ.get("SIGIL_FEED_PROTOC_PYTHON", sys.executable)
        subprocess.run([base, "-m", "venv", str(root)], check=True)
        install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", *REQUIREMENTS]
        if subprocess.run(install).returncode != 0:
            raise SystemExit(f"cannot install {TOOLS} with {base} (its wheels are for CPython 3.7 to 3.11): "
                             "set SIGIL_FEED_PROTOC_PYTHON to such an interpreter")
        ready.touch()
        return python


def generate(proto_dir: Path, out_dir: Path) -> None:
    """Compile every .proto in proto_dir into out_dir with TOOLS, with package-relative imports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in proto_dir.glob("*.proto"))
    args = [str(toolchain()), "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if subprocess.run(args).returncode != 0:
        raise SystemExit("protoc failed")
    for grpc_file in out_dir.glob("*_pb2_grpc.py"):
        text = grpc_file.read_text()
        grpc_file.write_text(re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M))
    for message_file in out_dir.glob("*_pb2.py"):
        text = message_file.read_text()
        message_file.write_text(re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'(\w+_pb2)'",
                                       rf"\1'{PACKAGE}.\2'", text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--requirements"]:
        print(" ".join(REQUIREMENTS))
        raise SystemExit
    root = Path(__file__).resolve().parent.parent / "protos"
    generate(root, Path(sys.argv[1]) if len(sys.argv) > 1 else root)
