"""Read YAML manifests strictly: duplicate keys and syntax errors are errors with a location."""

from __future__ import annotations

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
        if key in seen:
            mark = key_node.start_mark
            raise ManifestError(
                f"line {mark.line + 1}: duplicate key '{key}'; keep one of the two entries"
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text ({error.reason})") from error
    try:
        contents = list(yaml.load_all(text, Loader=_StrictLoader))
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(f"{path}: invalid YAML: {where}{problem}") from error
    documents = [Document(path, i, c) for i, c in enumerate(contents) if c is not None]
    if not documents:
        raise ManifestError(f"{path}: no YAML document in the file")
    return documents
