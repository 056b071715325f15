"""Packaging guarantees: the client imports without the server's libraries, and its messages pickle (the committed
protos are checked against the pinned generator in test_client_min_versions.py, in .ci/run's client floor step)."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'pyarrow', 'datasets', 'transformers', 'tokenizers', 'pydantic', 'yaml'}:
            raise ImportError(f'blocked in this test: {name}')
sys.meta_path.insert(0, Block())
"""


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120)


def test_client_imports_without_server_dependencies() -> None:
    result = run_isolated(
        "import sigil_feed.client as c\n"
        "from sigil_feed.client import FeedDataset, BatchStream\n"
        "assert 'sigil_feed.server' not in sys.modules\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_client_package_imports_without_torch() -> None:
    result = run_isolated("sys.modules['torch'] = None\nimport sigil_feed.client\n"
                          "import sigil_feed.client.integrations\nprint('ok')\n")
    assert result.returncode == 0, result.stderr


def test_generated_messages_register_under_the_package_so_they_pickle() -> None:
    """protoc names the module `feed_pb2`; the generated code must say `sigil_feed.protos.feed_pb2`."""
    result = run_isolated("import pickle\nfrom sigil_feed.protos import feed_pb2\n"
                          "info = feed_pb2.DatasetInfo(name='x', fingerprint='fp')\n"
                          "assert pickle.loads(pickle.dumps(info)) == info\nprint('ok')\n")
    assert result.returncode == 0, result.stderr
