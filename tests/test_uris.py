"""URI parsing: accepted forms and refused ones, with messages that say the fix."""

from __future__ import annotations

import pytest

from relora_api.uris import InvalidURI, parse_uri


@pytest.mark.parametrize(
    ("uri", "scheme", "authority", "path"),
    [
        ("models/v1", "path", "", "models/v1"),
        ("/data/models/v1", "path", "", "/data/models/v1"),
        ("pvc://adapters/sentiment/v1", "pvc", "adapters", "sentiment/v1"),
        ("pvc://adapters", "pvc", "adapters", ""),
        ("s3://ml-adapters/llama/", "s3", "ml-adapters", "llama"),
        ("hf://meta-llama/Llama-3.1-8B", "hf", "meta-llama/Llama-3.1-8B", ""),
        ("hf://org/data-set/train.jsonl", "hf", "org/data-set", "train.jsonl"),
        ("a..b/c", "path", "", "a..b/c"),
    ],
)
def test_accepted(uri: str, scheme: str, authority: str, path: str) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.authority, parsed.path) == (scheme, authority, path)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "must not be empty"),
        ("../secrets", "'..' path segments"),
        ("models/../../etc/passwd", "'..' path segments"),
        ("pvc://claim/../other", "'..' path segments"),
        ("s3://bucket/a/..", "'..' path segments"),
        ("gs://bucket/key", "unsupported URI scheme 'gs://'"),
        ("file:///etc/passwd", "unsupported URI scheme 'file://'"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("s3://B/x", "not a valid S3 bucket name"),
        ("hf://only-org", "expected hf://ORG/NAME"),
        (" models/v1", "white space"),
        ("a\nb", "NUL or newline"),
        ("x" * 1025, "at most 1024"),
    ],
)
def test_refused(uri: str, message: str) -> None:
    with pytest.raises(InvalidURI, match=message.replace("(", r"\(").replace("/", "/")):
        parse_uri(uri)


def test_round_trip_to_string() -> None:
    for uri in ["pvc://c/a/b", "s3://bucket/key", "hf://o/n", "rel/path"]:
        assert str(parse_uri(uri)) == uri
