"""Storage URIs accepted in an AdapterMigration: the one place their rules live.

Accepted forms:

- a plain path (``models/v1``, ``/data/models/v1``): a local folder or file; relative paths are
  resolved against the manifest's folder by the local runner;
- ``pvc://CLAIM[/PATH]``: a path inside a PersistentVolumeClaim mounted into the trainer pod;
- ``s3://BUCKET[/KEY]``: an object-store prefix;
- ``hf://ORG/NAME[/PATH]``: a Hugging Face Hub repository (the revision is a separate field).

A ``..`` path segment is rejected everywhere: a URI never escapes the folder it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["path", "pvc", "s3", "hf"]

SCHEMES: tuple[str, ...] = ("pvc", "s3", "hf")
"""The URI schemes with a ``scheme://`` prefix; anything without one is a plain path."""

MAX_URI_LENGTH = 1024

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# CEL rules rendered into the CRD from the same facts, so that the API server refuses what
# `relora validate` refuses (the operator re-checks everything with `parse_uri`).
CEL_RULES: list[dict[str, str]] = [
    {
        "rule": "!self.matches('(^|/)[.][.](/|$)')",
        "message": "must not contain '..' path segments",
    },
    {
        "rule": "!self.contains('://') || self.matches('^(" + "|".join(SCHEMES) + ")://')",
        "message": "unsupported URI scheme; use pvc://, s3://, hf:// or a plain path",
    },
]


class InvalidURI(ValueError):
    """A URI that the project cannot read from or write to."""


@dataclass(frozen=True)
class ParsedURI:
    """A URI split into its scheme, authority (claim, bucket or org/name) and path."""

    scheme: Scheme
    authority: str
    path: str

    def __str__(self) -> str:
        if self.scheme == "path":
            return self.path
        tail = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{self.authority}{tail}"


def _check_segments(path: str) -> list[str]:
    segments = path.split("/")
    if ".." in segments:
        raise InvalidURI("must not contain '..' path segments (a URI may not escape its folder)")
    if any(ch in path for ch in ("\x00", "\n", "\r")):
        raise InvalidURI("must not contain NUL or newline characters")
    return segments


def parse_uri(uri: str) -> ParsedURI:
    """Parse and check ``uri``; raise :class:`InvalidURI` with a message that says the fix."""
    if not uri or not uri.strip():
        raise InvalidURI("must not be empty")
    if uri != uri.strip():
        raise InvalidURI("must not start or end with white space")
    if len(uri) > MAX_URI_LENGTH:
        raise InvalidURI(f"must be at most {MAX_URI_LENGTH} characters")
    if "://" not in uri:
        _check_segments(uri)
        return ParsedURI(scheme="path", authority="", path=uri)
    scheme, rest = uri.split("://", 1)
    if scheme not in SCHEMES:
        raise InvalidURI(
            f"unsupported URI scheme '{scheme}://'; use pvc://, s3://, hf:// or a plain path"
        )
    segments = _check_segments(rest)
    authority, path = segments[0], "/".join(segments[1:]).strip("/")
    if scheme == "pvc":
        if not _DNS_SUBDOMAIN.match(authority):
            raise InvalidURI(
                f"'{authority}' is not a valid PersistentVolumeClaim name; expected "
                "pvc://CLAIM/PATH with a lower-case DNS name as CLAIM"
            )
        return ParsedURI(scheme="pvc", authority=authority, path=path)
    if scheme == "s3":
        if not _S3_BUCKET.match(authority):
            raise InvalidURI(
                f"'{authority}' is not a valid S3 bucket name; expected s3://BUCKET/KEY with "
                "a 3-63 character lower-case bucket"
            )
        return ParsedURI(scheme="s3", authority=authority, path=path)
    # hf://ORG/NAME[/PATH]
    if len(segments) < 2 or not all(_HF_PART.match(s) for s in segments[:2]):
        raise InvalidURI(
            "expected hf://ORG/NAME (a Hugging Face repository id); put the revision in the "
            "'revision' field"
        )
    return ParsedURI(
        scheme="hf", authority=f"{segments[0]}/{segments[1]}", path="/".join(segments[2:])
    )
