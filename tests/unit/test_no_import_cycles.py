"""Layers only point down: no import cycle among the server's modules or the benchmarks', and only rpc/ and cli/
speak the protocol (grpc and the generated protos)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

ROOTS = {"sigil_feed.server": REPO / "server", "bench": REPO / "bench"}
"""Import name -> folder (pyproject.toml's package-dir mapping, for the trees checked here)."""
PROTOCOL = ("grpc", "grpc_health", "grpc_reflection", "sigil_feed.protos")
SPEAK_PROTOCOL = ("sigil_feed.server.rpc", "sigil_feed.server.cli")


def modules() -> dict[str, Path]:
    """Every module of the checked trees by its import name (a package by its own name, for its __init__.py)."""
    out = {}
    for prefix, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


def imported(name: str, path: Path) -> Iterator[str]:
    """Every module `name` imports, anywhere in the file (functions and TYPE_CHECKING blocks included), with
    relative imports resolved; `from package import name` yields package.name too (it may be a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def ancestors(name: str) -> list[str]:
    """The packages Python initialises before `name`: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def graph() -> dict[str, set[str]]:
    """Module -> the checked modules importing it runs: the module itself and its packages' __init__ (those that
    the importer is not already inside)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        mine = set(ancestors(name))
        for target in imported(name, path):
            for module in [*ancestors(target), target]:
                if module in known and module not in mine and module != name:
                    edges[name].add(module)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_against_the_package(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom ..feed import served\nif TYPE_CHECKING:\n"
                      "    from .service import X\ndef f():\n    from ...protos import feed_pb2\n")
    got = set(imported("sigil_feed.server.rpc.m", source))
    assert {"sigil_feed.server.feed", "sigil_feed.server.feed.served", "sigil_feed.server.rpc.service",
            "sigil_feed.protos", "sigil_feed.protos.feed_pb2"} <= got


def test_no_import_cycles_among_server_and_bench_modules() -> None:
    edges = graph()
    assert len(edges) > 50 and edges["sigil_feed.server.rpc.app"]  # the trees were found and parsed
    assert cycles(edges) == []


def test_only_rpc_and_cli_import_grpc_or_the_protos() -> None:
    speaking = sorted(f"{name} imports {target}" for name, path in modules().items()
                      if name.startswith("sigil_feed.server") and not name.startswith(SPEAK_PROTOCOL)
                      for target in imported(name, path)
                      if any(target == p or target.startswith(p + ".") for p in PROTOCOL))
    assert speaking == []


def deepest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain (a path down the graph, which has no cycles): importer first."""
    below: dict[str, list[str]] = {}

    def chain(name: str) -> list[str]:
        if name not in below:
            longest = max((chain(child) for child in edges[name]), key=len, default=[])
            below[name] = [name, *longest]
        return below[name]

    return max((chain(name) for name in sorted(edges)), key=len, default=[])


def test_the_server_is_a_few_floors_deep() -> None:
    """Folders are the data path, so the deepest import chain is about as long as the path: it was 15 modules when
    every stage sat flat in server/."""
    server = {name: {t for t in targets if t.startswith("sigil_feed.server")}
              for name, targets in graph().items() if name.startswith("sigil_feed.server")}
    chain = deepest_chain(server)
    assert deepest_chain({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
    assert len(chain) <= 18, " -> ".join(chain)


if __name__ == "__main__":  # python -m tests.unit.test_no_import_cycles: the house in numbers
    edges = graph()
    folders: dict[str, int] = {}
    for name in modules():
        if name.startswith("sigil_feed.server."):
            folder = name.split(".")[2] if name.count(".") > 2 or modules()[name].name == "__init__.py" else "."
            folders[folder] = folders.get(folder, 0) + 1
    print("modules per folder of server/:", ", ".join(f"{k}/ {v}" for k, v in sorted(folders.items())))
    server = {n: {t for t in ts if t.startswith("sigil_feed.server")} for n, ts in edges.items()
              if n.startswith("sigil_feed.server")}
    chain = deepest_chain(server)
    print(f"deepest import chain ({len(chain)} modules):", " -> ".join(c.removeprefix("sigil_feed.server.")
                                                                     for c in chain))
