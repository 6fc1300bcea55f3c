"""Read YAML manifests strictly: duplicate keys and syntax errors are errors with a location."""

from __future__ import annotations

import reprlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ManifestError(ValueError):
    """A manifest file that cannot be read or parsed."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            mark = key_node.start_mark
            raise ManifestError(
                f"line {mark.line + 1}: a mapping key must be a scalar, not a {type(key).__name__}"
            ) from None
        if key in seen:
            mark = key_node.start_mark
            raise ManifestError(
                f"line {mark.line + 1}: duplicate key {reprlib.repr(key)}; keep one of the two "
                "entries"
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_NODES = 1_000_000
"""Nodes a document may hold once its aliases are expanded (a 64-adapter manifest has a few
thousand): refuses "billion laughs" documents, whose few lines expand to billions of values."""

MAX_DEPTH = 100
"""Nesting levels a document may have (Kubernetes objects have about 15)."""

MAX_BYTES = 16 * 2**20
"""Size of a manifest file (the API server takes requests of at most 3 MiB)."""


def _check_size(root: yaml.Node) -> None:
    """Refuse a document deeper than MAX_DEPTH or larger than MAX_NODES once its aliases are
    expanded (linear time: an aliased node is sized once); an alias cycle is too large."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            open_nodes.discard(id(node))
            total = 1 + sum(sizes[id(child)] for child in children)
            sizes[id(node)] = min(total, MAX_NODES + 1)
            continue
        if depth > MAX_DEPTH:
            raise ManifestError(
                f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep"
            )
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            sizes[id(root)] = MAX_NODES + 1
            break
        open_nodes.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children)
    if sizes[id(root)] > MAX_NODES:
        raise ManifestError(
            f"line {root.start_mark.line + 1}: the document expands to more than {MAX_NODES} "
            "values through YAML aliases (*name); write it out plainly"
        )


def _load_all(text: str) -> list[Any]:
    """``yaml.load_all`` with the strict loader, refusing documents too deep or too large."""
    loader = _StrictLoader(text)
    try:
        contents = []
        while loader.check_node():
            try:
                node = loader.get_node()
            except RecursionError:
                raise ManifestError(f"nested more than {MAX_DEPTH} levels deep") from None
            if node is None:
                continue
            _check_size(node)
            contents.append(loader.construct_document(node))
        return contents
    finally:
        loader.dispose()


@dataclass(frozen=True)
class Document:
    """One YAML document of a manifest file."""

    source: str
    index: int
    content: Any

    @property
    def label(self) -> str:
        return self.source if self.index == 0 else f"{self.source} (document {self.index + 1})"


def read_documents(path: str) -> list[Document]:
    """Parse every non-empty YAML document of ``path`` (``-`` reads standard input)."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_BYTES + 1)
        else:
            with Path(path).open("rb") as handle:
                raw = handle.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_BYTES // 2**20} MiB; not a manifest")
        text = raw.decode("utf-8")
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text ({error.reason})") from error
    try:
        contents = _load_all(text)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ManifestError(f"{path}: invalid YAML: {where}{problem}") from error
    documents = [Document(path, i, c) for i, c in enumerate(contents) if c is not None]
    if not documents:
        raise ManifestError(f"{path}: no YAML document in the file")
    return documents
