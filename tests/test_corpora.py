"""The testbed corpora: pure parsers on hand-made fixtures, and fetching with apt/dpkg faked."""

from __future__ import annotations

import bz2
import concurrent.futures
import gzip
import lzma
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rdata.conversion import convert_python_to_r_data
from rdata.unparser import unparse_data

from relora_lab.testbed import corpora
from relora_lab.testbed.corpora import CorpusError, NounSense

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "corpora"

BIBLE_LISTING = """\
Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void; and darkness was upon the face of the deep.

1Cor13:4 Charity suffereth long, and is kind; charity envieth not;
SSol2:1 I am the rose of Sharon, and the lily of the valleys.
Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.
"""

BIBLE_VERSES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Charity suffereth long, and is kind; charity envieth not;",
    "I am the rose of Sharon, and the lily of the valleys.",
    "The grace of our Lord Jesus Christ be with you all. Amen.",
]

NOVEL_LINES = {
    name: [title.upper(), "", "By Jane Austen", "", f"CHAPTER I of {name}, naïve café"]
    for name, title in corpora.AUSTEN_TITLES.items()
}


# --- R lazy-load databases, built the way R's makeLazyLoadDB lays them out -------------------


def serialize_r(value: Any) -> bytes:
    """``value`` as R's XDR serialization (what ``serialize()`` writes), via rdata's writer."""
    return unparse_data(convert_python_to_r_data(value), file_format="xdr", file_type="rds")


def xz_raw(data: bytes) -> bytes:
    """Compress as R_compress3 does: a raw LZMA2 stream, preset 6, no .xz container."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def frame_record(serialized: bytes, *, compression: int, method: bytes = b"") -> bytes:
    """Frame one record as R's R_compress1/2/3 do: length, method byte (2 and 3), data."""
    if compression == 0:
        return serialized
    packers: dict[bytes, Callable[[bytes], bytes]] = {
        b"0": bytes,
        b"1": zlib.compress,
        b"2": bz2.compress,
        b"Z": xz_raw,
    }
    method = method or {1: b"1", 2: b"2", 3: b"Z"}[compression]
    header = len(serialized).to_bytes(4, "big") + (b"" if compression == 1 else method)
    return header + packers[method](serialized)


def build_lazyload(objects: Mapping[str, Any], *, compression: int = 1) -> tuple[bytes, bytes]:
    """A (.rdx, .rdb) pair holding ``objects``; the index is gzip-compressed like R's."""
    rdb = b""
    variables = {}
    for name, value in objects.items():
        record = frame_record(serialize_r(value), compression=compression)
        variables[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    compressed: bool | int = True if compression == 1 else compression
    index = {"variables": variables, "references": {}, "compressed": compressed}
    return gzip.compress(serialize_r(index)), rdb


def novel_db(compression: int = 1) -> tuple[bytes, bytes]:
    """A tiny janeaustenr-like database: each novel a short character vector."""
    return build_lazyload(
        {name: np.array(lines) for name, lines in NOVEL_LINES.items()}, compression=compression
    )


@pytest.mark.parametrize(("compression", "method"), [(1, b""), (2, b"2"), (3, b"Z"), (3, b"0")])
def test_lazyload_record_round_trips(compression: int, method: bytes) -> None:
    payload = serialize_r(np.array(["one", "two"]))
    record = frame_record(payload, compression=compression, method=method)
    assert record != payload
    assert corpora.decompress_lazyload_record(record, compression=compression) == payload


# The record of `state.abb` in R 4.2.2's datasets lazy-load database (Debian r-base-core),
# which R writes with compress = 3: a character vector of the 50 US state abbreviations.
R_STATE_ABB_RECORD = bytes.fromhex(
    "0000021c5ae0021b00915d002c027c19f9aff41d3b9e98357eead93dd4548b6834aebde6edf8d2b2a1ae3387"
    "0c671a52a7bbfa28c31c6046673dcf976f7bf0008270dd48cfe5de992d8027b69650d51de183cae89c261b56"
    "a0e614f0b20665d9cbd41b26772b6b0b2ab6fb5ecc966e96e80eccfe410295805c28a9303567ee6e67336971"
    "cbb8b092463991d7a422d23d75291809159455658f549e310200"
)


def test_lazyload_record_written_by_r_is_read() -> None:
    serialized = corpora.decompress_lazyload_record(R_STATE_ABB_RECORD, compression=3)
    abbreviations = corpora.read_r_serialized(serialized).tolist()
    assert len(abbreviations) == 50
    assert abbreviations[:3] == ["AL", "AK", "AZ"]
    assert abbreviations[-1] == "WY"


def test_uncompressed_lazyload_record_is_returned_as_is() -> None:
    payload = serialize_r(np.array(["one"]))
    assert corpora.decompress_lazyload_record(payload, compression=0) == payload


def test_lazyload_record_with_wrong_length_is_rejected() -> None:
    record = frame_record(b"X\nabc", compression=1)
    broken = (999).to_bytes(4, "big") + record[4:]
    with pytest.raises(ValueError, match="header says 999"):
        corpora.decompress_lazyload_record(broken, compression=1)


def test_lazyload_record_with_unknown_method_is_rejected() -> None:
    record = (3).to_bytes(4, "big") + b"Qabc"
    with pytest.raises(ValueError, match="method b'Q'"):
        corpora.decompress_lazyload_record(record, compression=3)


def test_lazyload_index_lists_offsets_and_compression() -> None:
    rdx, rdb = build_lazyload({"a": np.array(["x"]), "b": np.array(["y", "z"])}, compression=2)
    index = corpora.parse_lazyload_index(rdx)
    assert index.compression == 2
    assert list(index.variables) == ["a", "b"]
    (a_offset, a_length), (b_offset, b_length) = index.variables["a"], index.variables["b"]
    assert (a_offset, b_offset) == (0, a_length)
    assert b_offset + b_length == len(rdb)


def test_lazyload_index_rejects_other_r_objects() -> None:
    with pytest.raises(ValueError, match="not an R lazy-load index"):
        corpora.parse_lazyload_index(gzip.compress(serialize_r({"x": np.array([1])})))


@pytest.mark.parametrize("compression", [0, 1, 2, 3])
def test_lazyload_db_reads_every_object(compression: int) -> None:
    rdx, rdb = build_lazyload(
        {"a": np.array(["x"]), "b": np.array(["y", "é"])}, compression=compression
    )
    objects = corpora.read_lazyload_db(rdx, rdb)
    assert {name: value.tolist() for name, value in objects.items()} == {
        "a": ["x"],
        "b": ["y", "é"],
    }


def test_austen_novels_are_joined_lines_in_publication_order() -> None:
    novels = corpora.austen_from_lazyload(*novel_db())
    assert list(novels) == [
        "Sense and Sensibility",
        "Pride and Prejudice",
        "Mansfield Park",
        "Emma",
        "Northanger Abbey",
        "Persuasion",
    ]
    assert novels["Emma"] == "EMMA\n\nBy Jane Austen\n\nCHAPTER I of emma, naïve café"


def test_austen_database_without_a_novel_is_rejected() -> None:
    objects = {name: np.array(lines) for name, lines in NOVEL_LINES.items() if name != "emma"}
    with pytest.raises(ValueError, match="lacks emma"):
        corpora.austen_from_lazyload(*build_lazyload(objects))


def test_austen_novel_that_is_not_a_character_vector_is_rejected() -> None:
    objects: dict[str, Any] = {name: np.array(lines) for name, lines in NOVEL_LINES.items()}
    objects["persuasion"] = {"x": np.array(["y"])}
    with pytest.raises(ValueError, match="persuasion is dict"):
        corpora.austen_from_lazyload(*build_lazyload(objects))


# --- The Bible ---------------------------------------------------------------------------------


def test_bible_listing_loses_references_and_blank_lines() -> None:
    assert corpora.parse_bible_listing(BIBLE_LISTING) == BIBLE_VERSES


def test_bible_listing_rejects_lines_that_are_not_verses() -> None:
    with pytest.raises(ValueError, match="line 2 is not a verse"):
        corpora.parse_bible_listing("Ge1:1 In the beginning\nGenesis\n")


# --- WordNet -----------------------------------------------------------------------------------


def test_wordnet_data_skips_licence_and_reads_every_synset() -> None:
    senses = corpora.parse_wordnet_data((FIXTURES / "data.noun").read_text())
    assert [(sense.lemma, sense.category) for sense in senses] == [
        ("entity", "noun.Tops"),
        ("dog", "noun.animal"),
        ("bicycle", "noun.artifact"),
        ("Austen", "noun.person"),
        ("oak", "noun.plant"),
        ("9/11", "noun.time"),
    ]


def test_wordnet_gloss_stops_before_the_first_example() -> None:
    senses = corpora.parse_wordnet_data((FIXTURES / "data.noun").read_text())
    assert senses[1] == NounSense(
        lemma="dog",
        gloss="a member of the genus Canis (probably descended from the common wolf) that has "
        "been domesticated by man since prehistoric times; occurs in many breeds",
        category="noun.animal",
    )
    assert senses[4].gloss == "a deciduous tree of the genus Quercus; has acorns and lobed leaves"


def test_wordnet_lemma_underscores_become_spaces() -> None:
    line = "09587565 18 n 02 Jane_Austen 0 Austen 0 000 | English novelist  "
    assert corpora.parse_wordnet_line(line).lemma == "Jane Austen"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("01234567 29 v 01 run 0 000 | move fast  ", "not a noun synset"),
        ("01234567 00 n 01 able 0 000 | having the means  ", "lex_filenum 0 is not a noun"),
    ],
)
def test_wordnet_rejects_lines_that_are_not_nouns(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corpora.parse_wordnet_data(f"  1 licence  \n{line}\n")


def test_noun_lexnames_cover_the_26_noun_files() -> None:
    assert sorted(corpora.NOUN_LEXNAMES) == list(range(3, 29))
    assert all(name.startswith("noun.") for name in corpora.NOUN_LEXNAMES.values())
    assert corpora.NOUN_LEXNAMES[6] == "noun.artifact"


# --- Fetching packages, with apt-get and dpkg faked --------------------------------------------


class FakeApt:
    """Stands in for subprocess.run: ``apt-get download`` writes a .deb, ``dpkg -x`` a file."""

    def __init__(self, *, download_error: str = "") -> None:
        self.calls: list[list[str]] = []
        self.download_error = download_error

    def __call__(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        cwd = Path(kwargs["cwd"])
        self.calls.append([Path(args[0]).name, *args[1:]])
        if args[1] == "download":
            if self.download_error:
                return subprocess.CompletedProcess(args, 100, "", self.download_error)
            (cwd / f"{args[2]}_1.0_all.deb").write_bytes(b"!<arch>\n")
        elif args[1] == "-x":
            dest = Path(args[3])
            (dest / "usr/share").mkdir(parents=True)
            (dest / "usr/share/payload").write_text(Path(args[2]).name)
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture
def fake_apt(monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    fake = FakeApt()
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def test_fetch_package_downloads_and_extracts_once(fake_apt: FakeApt, tmp_path: Path) -> None:
    root = corpora.fetch_package("wordnet-base", cache=tmp_path)
    assert root == tmp_path / "debs" / "wordnet-base"
    assert (root / "usr/share/payload").read_text() == "wordnet-base_1.0_all.deb"
    assert (root / corpora.COMPLETE_MARKER).is_file()
    assert [call[:2] for call in fake_apt.calls] == [["apt-get", "download"], ["dpkg", "-x"]]

    assert corpora.fetch_package("wordnet-base", cache=tmp_path) == root
    assert len(fake_apt.calls) == 2


def test_builds_fetching_a_package_at_once_fetch_it_once(
    fake_apt: FakeApt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds (threads here, processes in use) want the same package at the same time: one
    downloads and extracts it while the other waits on the lock, then finds it complete. (Without
    the lock the second removed the first's half-extracted folder: dpkg -x failed.)"""
    slow = FakeApt()

    def extracting_slowly(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = slow(args, **kwargs)
        time.sleep(0.3)
        return done

    monkeypatch.setattr(subprocess, "run", extracting_slowly)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: corpora.fetch_package("bible-kjv", cache=tmp_path), [1, 2]))
    assert roots == [tmp_path / "debs" / "bible-kjv"] * 2
    assert [call[:2] for call in slow.calls] == [["apt-get", "download"], ["dpkg", "-x"]]
    assert (roots[0] / corpora.COMPLETE_MARKER).is_file()


def test_fetch_package_redoes_a_half_done_extraction(fake_apt: FakeApt, tmp_path: Path) -> None:
    stale = tmp_path / "debs" / "bible-kjv" / "usr" / "half-written"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    root = corpora.fetch_package("bible-kjv", cache=tmp_path)
    assert not stale.exists()
    assert (root / "usr/share/payload").is_file()
    assert len(fake_apt.calls) == 2


def test_fetch_package_without_apt_get_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CorpusError) as caught:
        corpora.fetch_package("wordnet-base", cache=tmp_path)
    message = str(caught.value)
    assert "'wordnet-base'" in message
    assert "'apt-get' is not on PATH" in message
    assert "apt-get update" in message
    assert "\n" not in message
    assert not (tmp_path / "debs").exists()


def test_failed_download_names_the_package_and_apt_get_update(
    fake_apt: FakeApt, tmp_path: Path
) -> None:
    fake_apt.download_error = "E: Unable to locate package nosuch\nW: Some index files failed\n"
    with pytest.raises(CorpusError) as caught:
        corpora.fetch_package("nosuch", cache=tmp_path)
    assert str(caught.value) == (
        "apt-get download nosuch failed: E: Unable to locate package nosuch; "
        "check the package name; run `apt-get update` (as root) and retry"
    )
    assert not (tmp_path / "debs" / "nosuch").exists()


def test_data_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RELORA_DATA_DIR", str(tmp_path / "corpora"))
    assert corpora.data_dir() == tmp_path / "corpora"
    monkeypatch.delenv("RELORA_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert corpora.data_dir() == tmp_path / ".cache" / "relora" / "testbed"


# --- The loaders on already-cached packages (no apt-get needed) ------------------------------


def cached_package(cache: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """Lay out ``files`` as an extracted, complete package in the cache."""
    root = cache / "debs" / name
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    (root / corpora.COMPLETE_MARKER).write_text(f"{name}.deb\n")
    return root


@pytest.fixture
def no_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a loader tries to fetch a package that is already cached."""
    monkeypatch.setattr(shutil, "which", lambda tool: None)


@pytest.mark.usefixtures("no_apt")
def test_austen_novels_reads_the_cached_package(tmp_path: Path) -> None:
    rdx, rdb = novel_db(compression=3)
    data = corpora.AUSTEN_DATA
    cached_package(tmp_path, "r-cran-janeaustenr", {f"{data}.rdx": rdx, f"{data}.rdb": rdb})
    novels = corpora.austen_novels(cache=tmp_path)
    assert novels["Persuasion"].startswith("PERSUASION\n\nBy Jane Austen")


@pytest.mark.usefixtures("no_apt")
def test_wordnet_nouns_reads_the_cached_package(tmp_path: Path) -> None:
    fixture = (FIXTURES / "data.noun").read_bytes()
    cached_package(tmp_path, "wordnet-base", {corpora.WORDNET_DATA_NOUN: fixture})
    nouns = corpora.wordnet_nouns(cache=tmp_path)
    assert [noun.lemma for noun in nouns if noun.category == "noun.person"] == ["Austen"]


@pytest.mark.usefixtures("no_apt")
def test_bible_text_runs_the_packaged_program(tmp_path: Path) -> None:
    listing = tmp_path / "listing.txt"
    listing.write_text(BIBLE_LISTING)
    # The real program reads bible.data from the folder named by -p; this one checks for it.
    script = (
        f'#!/bin/sh\n[ "$*" = "-f -p . Gen1:1-Rev22:21" ] && [ -f bible.data ] && cat {listing}\n'
    )
    program = cached_package(tmp_path, "bible-kjv", {corpora.BIBLE_PROGRAM: script.encode()})
    (program / corpora.BIBLE_PROGRAM).chmod(0o755)
    cached_package(tmp_path, "bible-kjv-text", {"usr/lib/bible.data": b"EC02"})
    assert corpora.bible_text(cache=tmp_path) == "\n".join(BIBLE_VERSES)


@pytest.mark.usefixtures("no_apt")
def test_package_with_another_layout_is_reported(tmp_path: Path) -> None:
    cached_package(tmp_path, "wordnet-base", {"usr/share/wordnet/data.verb": b""})
    with pytest.raises(
        CorpusError, match=re.escape("'wordnet-base' has no usr/share/wordnet/data.noun")
    ):
        corpora.wordnet_nouns(cache=tmp_path)
