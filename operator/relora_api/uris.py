"""Storage URIs accepted in an AdapterMigration: the one place their rules live.

Accepted forms:

- a plain path (``models/v1``, ``/data/models/v1``): a local folder or file; relative paths are
  resolved against the manifest's folder by the local runner;
- ``pvc://CLAIM[/PATH]``: a path inside a PersistentVolumeClaim mounted into the trainer pod;
- ``s3://BUCKET[/KEY]``: an object-store prefix;
- ``hf://ORG/NAME[/PATH]``: a Hugging Face Hub repository (the revision is a separate field).

A ``..`` path segment is rejected everywhere, spelled plainly or percent-encoded (``%2e%2e``): a
URI never escapes the folder it names. So are control characters, backslashes, white space at
either end, schemes other than the three above (``file://``, ``javascript:``) and empty path
segments after a claim, bucket or repository (``pvc://claim//etc``: the path inside is relative).

Each rule is one regular expression in the subset that Python's ``re`` and RE2 (the API
server's CEL) read alike; :func:`parse_uri` and the CEL rules rendered into the CRD use the same
expressions, so that the API server refuses exactly what ``relora validate`` refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["path", "pvc", "s3", "hf"]

SCHEMES: tuple[str, ...] = ("pvc", "s3", "hf")
"""The URI schemes with a ``scheme://`` prefix; anything without one is a plain path."""

MAX_URI_LENGTH = 1024

_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
_S3_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"

# Every character str.isspace() knows that is not a control character (those are refused
# anywhere). Real characters, not escapes: RE2 has no \u escape (the CEL rendering escapes them).
_SPACES = " \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

CONTROL = r"[\x00-\x1f\x7f-\x9f]"
EDGE_SPACE = f"^[{_SPACES}]|[{_SPACES}]$"
BACKSLASH = r"\x5c"
# A '..' segment: dots plain or as %2e, between '/' (or %2f, %5c) or the ends.
DOT_DOT = r"(?i)(^|/|%2f|%5c)([.]|%2e)([.]|%2e)(/|%2f|%5c|$)"
SCHEME_LIKE = r"^[A-Za-z][A-Za-z0-9+.-]*:"
KNOWN_SCHEME = "^(" + "|".join(SCHEMES) + ")://"
AUTHORITY = {
    "pvc": f"^pvc://{_DNS_SUBDOMAIN}(/|$)",
    "s3": f"^s3://{_S3_BUCKET}(/|$)",
    "hf": f"^hf://{_HF_PART}/{_HF_PART}(/|$)",
}
EMPTY_SEGMENT = "^(" + "|".join(SCHEMES) + ")://.*//"

_MESSAGES = {
    "control": "must not contain control characters such as NUL or newline",
    "space": "must not start or end with white space",
    "backslash": "must not contain backslashes; separate path segments with '/'",
    "dot-dot": "must not contain '..' path segments",
    "scheme": "unsupported URI scheme; use pvc://, s3://, hf:// or a plain path",
    "pvc": "expected pvc://CLAIM/PATH with a lower-case DNS name as CLAIM",
    "s3": "expected s3://BUCKET/KEY with a 3-63 character lower-case bucket",
    "hf": "expected hf://ORG/NAME (a Hugging Face repository id)",
    "empty-segment": (
        "must not contain an empty path segment ('//') after the claim, bucket or repository: "
        "the path inside it is relative"
    ),
}


def _cel_string(pattern: str) -> str:
    """``pattern`` as a single-quoted CEL string literal (RE2 gets the same characters)."""
    out = []
    for char in pattern:
        if char in "\\'":
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) > 0x7E:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def _matches(pattern: str) -> str:
    return f"self.matches({_cel_string(pattern)})"


# CEL rules rendered into the CRD from the same expressions (the operator re-checks everything
# with `parse_uri`). Kept few: each costs CEL budget per URI field and adapter.
CEL_RULES: list[dict[str, str]] = [
    {"rule": f"!{_matches(CONTROL)}", "message": _MESSAGES["control"]},
    {"rule": f"!{_matches(EDGE_SPACE)}", "message": _MESSAGES["space"]},
    {"rule": f"!{_matches(BACKSLASH)}", "message": _MESSAGES["backslash"]},
    {"rule": f"!{_matches(DOT_DOT)}", "message": _MESSAGES["dot-dot"]},
    {
        "rule": (f"!({_matches(SCHEME_LIKE)} || self.contains('://')) || {_matches(KNOWN_SCHEME)}"),
        "message": _MESSAGES["scheme"],
    },
    *(
        {
            "rule": f"!self.startsWith('{scheme}://') || {_matches(AUTHORITY[scheme])}",
            "message": _MESSAGES[scheme],
        }
        for scheme in SCHEMES
    ),
    {"rule": f"!{_matches(EMPTY_SEGMENT)}", "message": _MESSAGES["empty-segment"]},
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


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a one-line message, shortened."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _unsupported(scheme: str) -> InvalidURI:
    return InvalidURI(
        f"unsupported URI scheme {_shown(scheme)}; use pvc://, s3://, hf:// or a plain path "
        "(write ./NAME for a local file whose name has a colon)"
    )


def _check(uri: str) -> None:
    if not uri:
        raise InvalidURI("must not be empty")
    if len(uri) > MAX_URI_LENGTH:
        raise InvalidURI(f"must be at most {MAX_URI_LENGTH} characters")
    if re.search(CONTROL, uri):
        raise InvalidURI(_MESSAGES["control"])
    if re.search(EDGE_SPACE, uri):
        raise InvalidURI(_MESSAGES["space"])
    if re.search(BACKSLASH, uri):
        raise InvalidURI(_MESSAGES["backslash"])
    if re.search(DOT_DOT, uri):
        raise InvalidURI(
            f"{_MESSAGES['dot-dot']}, plain or percent-encoded (a URI may not escape its folder)"
        )
    if not re.search(KNOWN_SCHEME, uri):
        if "://" in uri:
            raise _unsupported(uri.split("://", 1)[0] + "://")
        if found := re.search(SCHEME_LIKE, uri):
            raise _unsupported(found.group(0))
    for scheme, pattern in AUTHORITY.items():
        if uri.startswith(f"{scheme}://") and not re.search(pattern, uri):
            authority = uri.removeprefix(f"{scheme}://").split("/", 1)[0]
            if scheme == "pvc":
                raise InvalidURI(
                    f"{_shown(authority)} is not a valid PersistentVolumeClaim name; "
                    f"{_MESSAGES['pvc']}"
                )
            if scheme == "s3":
                raise InvalidURI(
                    f"{_shown(authority)} is not a valid S3 bucket name; {_MESSAGES['s3']}"
                )
            raise InvalidURI(f"{_MESSAGES['hf']}; put the revision in the 'revision' field")
    if re.search(EMPTY_SEGMENT, uri):
        raise InvalidURI(_MESSAGES["empty-segment"])


def parse_uri(uri: str) -> ParsedURI:
    """Parse and check ``uri``; raise :class:`InvalidURI` with a message that says the fix."""
    _check(uri)
    if "://" not in uri:
        return ParsedURI(scheme="path", authority="", path=uri)
    scheme, rest = uri.split("://", 1)
    segments = rest.split("/")
    if scheme == "hf":
        return ParsedURI(
            scheme="hf", authority="/".join(segments[:2]), path="/".join(segments[2:]).strip("/")
        )
    path = "/".join(segments[1:]).strip("/")
    return ParsedURI(scheme="pvc" if scheme == "pvc" else "s3", authority=segments[0], path=path)


def join(root: str, name: str) -> str:
    """``root/name``: where an output root puts the folder ``name`` (one '/' between them)."""
    return f"{root.rstrip('/')}/{name}"


def _place(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, authority, path segments) with '.' and empty segments dropped; an absolute
    plain path has the authority '/'."""
    parsed = parse_uri(uri)
    authority = parsed.authority
    if parsed.scheme == "path" and parsed.path.startswith("/"):
        authority = "/"
    segments = tuple(s for s in parsed.path.split("/") if s not in ("", "."))
    return parsed.scheme, authority, segments


Overlap = Literal["is", "contains", "lies inside"]


def overlap(uri: str, other: str) -> Overlap | None:
    """How ``uri`` relates to ``other`` when one is the other or inside it, by their text
    (a relative and an absolute path are not compared: the trainer compares the folders they
    resolve to); None when they are apart."""
    scheme, authority, path = _place(uri)
    other_scheme, other_authority, other_path = _place(other)
    if (scheme, authority) != (other_scheme, other_authority):
        return None
    if path == other_path:
        return "is"
    if path[: len(other_path)] == other_path:
        return "lies inside"
    if other_path[: len(path)] == path:
        return "contains"
    return None


def _cel_apart(output: str, uri: str) -> str:
    """CEL: the text of ``uri`` is neither the folder ``output`` nor inside it, nor above it."""
    above = f"({uri}.endsWith('/') ? {uri} : {uri} + '/')"
    return f"!(({uri} + '/').startsWith({output} + '/') || ({output} + '/').startsWith({above}))"


def _cel_present(path: str) -> str:
    """CEL: every field on ``path`` (``root.a.b``) is set; a missing one is the schema's to
    report, and the rule must not fail evaluating it."""
    parts = path.split(".")
    return " && ".join(f"has({'.'.join(parts[: i + 1])})" for i in range(1, len(parts)))


def cel_outputs_apart(*, root: str, adapters: str, inputs: list[str]) -> str:
    """A CEL rule: every adapter's output folder (``root``/NAME) is apart from its inputs.

    ``adapters`` is the CEL list of adapters (bound to ``a``), ``inputs`` the field paths of the
    URIs to keep apart (``self.sourceModel.uri``, ``a.data.test``); unset ones are skipped. A
    textual check for the API server; the models and the trainer also normalize paths and
    resolve folders."""
    folder = f"({root}.endsWith('/') ? {root} : {root} + '/') + a.name"
    listed = " + ".join(f"({_cel_present(path)} ? [{path}] : [])" for path in inputs)
    apart = f"a, !has(a.name) || ({listed}).all(u, {_cel_apart(folder, 'u')})"
    return f"!({_cel_present(root)}) || !has({adapters}) || {adapters}.all({apart})"
