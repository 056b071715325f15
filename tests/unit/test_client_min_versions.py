"""The thin client's floors: what the generated code allows, and (in .ci/run's floor step, SIGIL_FEED_CLIENT_FLOOR=1)
that the client works with exactly those versions and none of the server's libraries installed.

Imports nothing beyond the client's own dependencies (not even tests/conftest.py), so that it runs in that step."""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))
from client_floors import floors
from gen_protos import TOOLS_VERSION, generate

REPO = Path(__file__).resolve().parent.parent.parent

SERVER_ONLY = ("pyarrow", "datasets", "transformers", "tokenizers", "pydantic", "yaml", "huggingface_hub", "boto3")


def test_the_client_needs_only_grpcio_protobuf_and_numpy() -> None:
    assert set(floors()) == {"grpcio", "protobuf", "numpy"}


def test_the_grpcio_floor_is_the_code_generators_version() -> None:
    """gRPC's rule: generated code needs grpcio at least as new as the grpcio-tools that wrote it."""
    assert floors()["grpcio"] == TOOLS_VERSION


def test_the_generated_code_checks_no_runtime_version() -> None:
    """Newer generators write checks that would raise the floors (protobuf >= theirs, grpcio >= theirs)."""
    messages = (REPO / "protos" / "feed_pb2.py").read_text()
    services = (REPO / "protos" / "feed_pb2_grpc.py").read_text()
    assert "ValidateProtobufRuntimeVersion" not in messages
    assert "GRPC_GENERATED_VERSION" not in services and "_registered_method" not in services


@pytest.mark.skipif(os.environ.get("SIGIL_FEED_CLIENT_FLOOR") != "1", reason="only in .ci/run's client floor step")
def test_the_floor_environment_has_exactly_the_floors_and_no_server_libraries() -> None:
    assert {name: version(name) for name in floors()} == floors()
    assert [name for name in SERVER_ONLY if importlib.util.find_spec(name)] == []
    import sigil_feed.client
    from sigil_feed.protos import feed_pb2, feed_pb2_grpc

    assert sigil_feed.client.BatchStream and feed_pb2_grpc.DataFeedStub
    assert feed_pb2.Batch.FromString(feed_pb2.Batch(seq=7).SerializeToString()).seq == 7
    assert not [name for name in sys.modules if name.startswith("sigil_feed.server")]


@pytest.mark.skipif(os.environ.get("SIGIL_FEED_CLIENT_FLOOR") != "1", reason="only in .ci/run's client floor step")
def test_the_committed_code_is_what_the_pinned_generator_writes(tmp_path: Path) -> None:
    """The floor step's environment has the generator (`gen_protos.py --requirements`: it needs protobuf<5, as
    the floors are); elsewhere `make protos` makes a virtual environment for it."""
    assert version("grpcio-tools") == TOOLS_VERSION
    generate(REPO / "protos", tmp_path)
    for generated in sorted(tmp_path.glob("*_pb2*")):
        committed = REPO / "protos" / generated.name
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run `make protos`"
