"""Real text corpora for the testbed, taken from Debian packages at set-up time.

Each package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` under a cache
folder (see :func:`data_dir`), once; nothing is installed system-wide and nothing needs root.

- Jane Austen's six novels: ``r-cran-janeaustenr`` (MIT), an R lazy-load database read with
  :mod:`rdata`.
- The King James Bible: ``bible-kjv-text`` holds the text in its own LZW-windowed format, which
  the ``bible`` program of ``bible-kjv`` prints (public-domain text; GPL-2+ program).
- WordNet 3.0 nouns: ``data.noun`` of ``wordnet-base`` (Princeton WordNet licence).

Parsing is done by pure functions of text or bytes, so it is testable without a network.
"""

from __future__ import annotations

import bz2
import fcntl
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import rdata
from rich.console import Console

from relora_trainer.errors import CorpusError as CorpusError  # raised by this module

DATA_DIR_ENV: Final = "RELORA_DATA_DIR"
"""Environment variable that overrides the default cache folder."""

COMPLETE_MARKER: Final = ".complete"
"""Written in a package's folder once it is fully extracted; holds the .deb file name."""

APT_HINT: Final = "run `apt-get update` (as root) and retry"

AUSTEN_PACKAGE: Final = "r-cran-janeaustenr"
AUSTEN_DATA: Final = "usr/lib/R/site-library/janeaustenr/data/Rdata"
"""The lazy-load database inside the package, without its .rdx/.rdb suffix."""

AUSTEN_TITLES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "sensesensibility": "Sense and Sensibility",
        "prideprejudice": "Pride and Prejudice",
        "mansfieldpark": "Mansfield Park",
        "emma": "Emma",
        "northangerabbey": "Northanger Abbey",
        "persuasion": "Persuasion",
    }
)
"""R object name -> novel title, in publication order."""

BIBLE_PROGRAM_PACKAGE: Final = "bible-kjv"
BIBLE_TEXT_PACKAGE: Final = "bible-kjv-text"
BIBLE_PROGRAM: Final = "usr/bin/bible"
BIBLE_DATA_FOLDER: Final = "usr/lib"
BIBLE_RANGE: Final = "Gen1:1-Rev22:21"

WORDNET_PACKAGE: Final = "wordnet-base"
WORDNET_DATA_NOUN: Final = "usr/share/wordnet/data.noun"

NOUN_LEXNAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        3: "noun.Tops",
        4: "noun.act",
        5: "noun.animal",
        6: "noun.artifact",
        7: "noun.attribute",
        8: "noun.body",
        9: "noun.cognition",
        10: "noun.communication",
        11: "noun.event",
        12: "noun.feeling",
        13: "noun.food",
        14: "noun.group",
        15: "noun.location",
        16: "noun.motive",
        17: "noun.object",
        18: "noun.person",
        19: "noun.phenomenon",
        20: "noun.plant",
        21: "noun.possession",
        22: "noun.process",
        23: "noun.quantity",
        24: "noun.relation",
        25: "noun.shape",
        26: "noun.state",
        27: "noun.substance",
        28: "noun.time",
    }
)
"""WordNet lexicographer file number (``lex_filenum``) -> name, for the 26 noun files."""


@dataclass(frozen=True)
class NounSense:
    """One WordNet noun synset: its first lemma, its definition and its lexicographer file."""

    lemma: str
    gloss: str
    category: str


@dataclass(frozen=True)
class LazyLoadIndex:
    """The index (``.rdx``) of an R lazy-load database (``.rdb``)."""

    variables: Mapping[str, tuple[int, int]]
    """Object name -> (offset, length) of its record in the ``.rdb`` file."""
    compression: int
    """How records are compressed: 0 none, 1 zlib, 2 bzip2, 3 xz (R's ``compress`` argument)."""


# --- Fetching packages ---------------------------------------------------------------------


def data_dir() -> Path:
    """The cache folder: ``$RELORA_DATA_DIR`` if set, else ``~/.cache/relora/testbed``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "relora" / "testbed"


def fetch_package(name: str, *, cache: Path) -> Path:
    """Download and extract Debian package ``name`` into ``cache/debs/<name>/``, once.

    Returns the folder that holds the package's file tree (``usr/...``). A folder without the
    completion marker is a half-done extraction and is redone. Builds running at the same time
    (one per world) take turns on a lock file beside it: one fetches, the others use its result.
    """
    dest = cache / "debs" / name
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    apt_get = _require_tool("apt-get", package=name)
    dpkg = _require_tool("dpkg", package=name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (dest / COMPLETE_MARKER).is_file():
            _fetch(apt_get, dpkg, name, dest)
    return dest


def _fetch(apt_get: str, dpkg: str, name: str, dest: Path) -> None:
    """Download package ``name`` and extract it into ``dest`` (replacing a half-done one)."""
    with (
        Console(stderr=True).status(f"Fetching Debian package {name}..."),
        tempfile.TemporaryDirectory(prefix="relora-deb-") as tmp,
    ):
        deb = _download(apt_get, name, folder=Path(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        _run(
            [dpkg, "-x", str(deb), str(dest)],
            cwd=Path(tmp),
            failure=f"dpkg -x {deb.name} failed",
            hint="the downloaded package may be corrupt; retry",
        )
    (dest / COMPLETE_MARKER).write_text(deb.name + "\n")


def _require_tool(tool: str, *, package: str) -> str:
    """The path of ``tool``, or a CorpusError naming the package that needed it."""
    path = shutil.which(tool)
    if path is None:
        raise CorpusError(
            f"cannot fetch Debian package {package!r}: {tool!r} is not on PATH; the testbed "
            f"corpora need a Debian-like system with apt-get and dpkg ({APT_HINT} once there)"
        )
    return path


def _download(apt_get: str, name: str, *, folder: Path) -> Path:
    """Run ``apt-get download name`` in ``folder`` and return the one .deb it wrote."""
    _run(
        [apt_get, "download", name],
        cwd=folder,
        failure=f"apt-get download {name} failed",
        hint=f"check the package name; {APT_HINT}",
    )
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise CorpusError(
            f"apt-get download {name} wrote {len(debs)} .deb files instead of 1; {APT_HINT}"
        )
    return debs[0]


def _run(args: Sequence[str], *, cwd: Path, failure: str, hint: str) -> str:
    """Run a command and return its stdout; raise a one-line CorpusError if it fails."""
    try:
        done = subprocess.run(
            list(args),
            cwd=cwd,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            check=False,
        )
    except OSError as err:
        raise CorpusError(f"{failure}: {err}; {hint}") from err
    if done.returncode != 0:
        reason = _summary(done.stderr) or f"exit code {done.returncode}"
        raise CorpusError(f"{failure}: {reason}; {hint}")
    return done.stdout


def _summary(stderr: str) -> str:
    """The line of a tool's stderr that best says what went wrong (apt's ``E:`` lines first)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    if errors:
        return errors[0]
    return lines[-1] if lines else ""


def _package_file(root: Path, relative: str, *, package: str) -> Path:
    """A file inside an extracted package, or a CorpusError if the package's layout changed."""
    path = root / relative
    if not path.is_file():
        raise CorpusError(
            f"Debian package {package!r} has no {relative}: its layout changed; "
            f"delete {root} and retry, or update relora_lab.testbed.corpora"
        )
    return path


# --- Jane Austen: an R lazy-load database ----------------------------------------------------

_R_LZMA2_FILTERS: Final = ({"id": lzma.FILTER_LZMA2, "preset": 6},)
"""R's xz records are a raw LZMA2 stream (no .xz container) made with preset 6."""


def _decompress_r_xz(data: bytes) -> bytes:
    """Decompress the payload of an R record of method ``Z``."""
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_R_LZMA2_FILTERS)


_DECOMPRESSORS: Final[Mapping[bytes, Callable[[bytes], bytes]]] = MappingProxyType(
    {b"0": bytes, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": _decompress_r_xz}
)
"""Method byte of an R-compressed record -> decompressor (R's ``R_decompress2/3``)."""


def read_r_serialized(data: bytes) -> Any:
    """Convert one R-serialized object (raw, or gzip/bzip2/xz-compressed) to Python."""
    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def parse_lazyload_index(rdx: bytes) -> LazyLoadIndex:
    """Read an ``.rdx`` index: a compressed R list (variables, references, compressed)."""
    index = read_r_serialized(rdx)
    try:
        keys = index["variables"]
        compressed = index["compressed"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"not an R lazy-load index: missing {err}") from err
    variables = {str(name): _offset_length(key) for name, key in keys.items()}
    return LazyLoadIndex(variables=variables, compression=int(np.asarray(compressed).item()))


def _offset_length(key: Any) -> tuple[int, int]:
    """An index key, an R integer vector ``c(offset, length)``, as a tuple."""
    values = np.asarray(key).tolist()
    if len(values) != 2:
        raise ValueError(f"bad lazy-load key {values!r}: expected (offset, length)")
    return int(values[0]), int(values[1])


def decompress_lazyload_record(record: bytes, *, compression: int) -> bytes:
    """Undo R's framing of one ``.rdb`` record and return the serialized object.

    Compression 1 is a 4-byte big-endian length then a zlib stream; 2 and 3 put a method byte
    (``0`` stored, ``1`` zlib, ``2`` bzip2, ``Z`` raw LZMA2) between the length and the data.
    """
    if compression == 0:
        return record
    if compression == 1:
        method, payload = b"1", record[4:]
    elif compression in (2, 3):
        method, payload = record[4:5], record[5:]
    else:
        raise ValueError(f"unknown lazy-load compression {compression}")
    decompress = _DECOMPRESSORS.get(method)
    if decompress is None:
        raise ValueError(f"unknown lazy-load record method {method!r}")
    data = decompress(payload)
    expected = int.from_bytes(record[:4], "big")
    if len(data) != expected:
        raise ValueError(f"lazy-load record is {len(data)} bytes, its header says {expected}")
    return data


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Every object of an R lazy-load database, converted to Python by :mod:`rdata`.

    Objects that point at environments (the index's ``references``) cannot be read: rdata does
    not resolve R's persistent references. Data packages of plain vectors never have them.
    """
    index = parse_lazyload_index(rdx)
    return {
        name: read_r_serialized(
            decompress_lazyload_record(rdb[offset : offset + length], compression=index.compression)
        )
        for name, (offset, length) in index.variables.items()
    }


def austen_from_lazyload(rdx: bytes, rdb: bytes) -> dict[str, str]:
    """Title -> full text of each novel in janeaustenr's database (lines joined by newlines)."""
    objects = read_lazyload_db(rdx, rdb)
    missing = sorted(set(AUSTEN_TITLES) - set(objects))
    if missing:
        raise ValueError(f"janeaustenr data lacks {', '.join(missing)}")
    return {title: _join_lines(objects[name], name=name) for name, title in AUSTEN_TITLES.items()}


def _join_lines(vector: Any, *, name: str) -> str:
    """An R character vector (a 1-D numpy array from rdata) joined by newlines; NA is empty."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1:
        raise ValueError(f"{name} is {type(vector).__name__}, not an R character vector")
    return "\n".join("" if line is None else str(line) for line in vector.tolist())


def austen_novels(*, cache: Path) -> dict[str, str]:
    """Jane Austen's six completed novels, title -> full text, from ``r-cran-janeaustenr``."""
    root = fetch_package(AUSTEN_PACKAGE, cache=cache)
    rdx = _package_file(root, AUSTEN_DATA + ".rdx", package=AUSTEN_PACKAGE)
    rdb = _package_file(root, AUSTEN_DATA + ".rdb", package=AUSTEN_PACKAGE)
    return austen_from_lazyload(rdx.read_bytes(), rdb.read_bytes())


# --- The King James Bible ------------------------------------------------------------------

_VERSE_LINE: Final = re.compile(
    r"(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)"
)


def parse_bible_listing(text: str) -> list[str]:
    """Verse texts, references removed, from ``bible -f`` output (``Ge1:1 In the beginning``)."""
    verses = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _VERSE_LINE.fullmatch(line.rstrip())
        if match is None:
            raise ValueError(f"bible listing line {number} is not a verse: {line[:60]!r}")
        verses.append(match["text"].strip())
    return verses


def bible_text(*, cache: Path) -> str:
    """The King James Bible, one verse per line without references (31,102 verses)."""
    program = _package_file(
        fetch_package(BIBLE_PROGRAM_PACKAGE, cache=cache),
        BIBLE_PROGRAM,
        package=BIBLE_PROGRAM_PACKAGE,
    )
    data = fetch_package(BIBLE_TEXT_PACKAGE, cache=cache) / BIBLE_DATA_FOLDER
    _package_file(data, "bible.data", package=BIBLE_TEXT_PACKAGE)
    # -f: one verse per line with its reference; -p .: read bible.data from cwd only.
    listing = _run(
        [str(program), "-f", "-p", ".", BIBLE_RANGE],
        cwd=data,
        failure=f"{program} could not print the Bible",
        hint="it needs libreadline8 (`apt-get install libreadline8`)",
    )
    return "\n".join(parse_bible_listing(listing))


# --- WordNet nouns -------------------------------------------------------------------------


def parse_wordnet_line(line: str) -> NounSense:
    """One synset line of ``data.noun``: ``offset lex_filenum n w_cnt word lex_id ... | gloss``."""
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    if len(parts) < 5 or parts[2] != "n":
        raise ValueError(f"not a noun synset line: {line[:60]!r}")
    lex_filenum = int(parts[1])
    category = NOUN_LEXNAMES.get(lex_filenum)
    if category is None:
        raise ValueError(f"lex_filenum {lex_filenum} is not a noun lexicographer file")
    definition = gloss.split('; "', 1)[0].strip()
    return NounSense(lemma=parts[4].replace("_", " "), gloss=definition, category=category)


def parse_wordnet_data(text: str) -> list[NounSense]:
    """Every synset of a ``data.noun`` file; licence lines (two leading spaces) are skipped."""
    senses = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("  ") or not line.strip():
            continue
        try:
            senses.append(parse_wordnet_line(line))
        except ValueError as err:
            raise ValueError(f"data.noun line {number}: {err}") from err
    return senses


def wordnet_nouns(*, cache: Path) -> list[NounSense]:
    """All WordNet 3.0 noun synsets (82,115) from ``wordnet-base``."""
    root = fetch_package(WORDNET_PACKAGE, cache=cache)
    data_noun = _package_file(root, WORDNET_DATA_NOUN, package=WORDNET_PACKAGE)
    return parse_wordnet_data(data_noun.read_text(encoding="utf-8"))
