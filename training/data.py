"""Byte-level text corpus built from English text that ships with Python itself.

Sources (all read from the running interpreter's standard library, no downloads):

- ``pydoc_data.topics``: the language reference topics behind ``help()`` (~465 KB);
- the docstrings of the standard library's modules, classes and functions (~1.4 MB);
- IDLE's help page, news and readme files, and Python's LICENSE (~200 KB).

Each source is cut into documents with stable ids. A document belongs to the
validation split when ``crc32(id) % 100 < val_percent``: deterministic, independent
of the order in which documents are found, and stable when a source grows.

Documents can quote each other: the pydoc topic ``compound`` holds the topics ``try``
and ``with`` word for word, ``specialnames`` holds ``customization``. So every passage
of ``SHARED_BYTES`` or more that a validation document also contains is cut out of
the training documents: the validation text is never trained on.
"""

from __future__ import annotations

import ast
import hashlib
import html
import math
import re
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.errors import DataError

SOURCES = ("pydoc_topics", "stdlib_docstrings", "idle_docs")
# The default: English prose (~670 KB). The docstrings are more varied and code-like;
# they make a larger but harder corpus, chosen with ``--sources``.
DEFAULT_SOURCES = ("pydoc_topics", "idle_docs")
DOC_SEPARATOR = b"\n\n"
# Training passages this long (or longer) that occur in the validation text are cut out.
SHARED_BYTES = 64
# Library folders whose docstrings are mostly test scaffolding or duplicates.
_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class TextCorpus:
    train: np.ndarray  # uint8 bytes of the training documents, separated by blank lines
    val: np.ndarray  # uint8 bytes of the validation documents
    sha256: str  # over both splits: identifies the exact text a model saw
    sources: tuple[str, ...]
    documents: tuple[int, int]  # (train, val) document counts

    def describe(self) -> dict[str, object]:
        return {
            "sources": list(self.sources),
            "sha256": self.sha256,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
            "train_documents": self.documents[0],
            "val_documents": self.documents[1],
        }


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pydoc_topics() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise DataError(
            "this Python lacks pydoc_data.topics; use --sources to pick others"
        ) from exc
    for key in sorted(topics):
        yield Document(f"pydoc:{key}", topics[key])


def stdlib_docstrings(min_chars: int = 40) -> Iterator[Document]:
    root = _stdlib()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0] in _SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                          | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(doc)
        if parts:
            yield Document(f"docstrings:{rel.as_posix()}", "\n\n".join(parts))


_TAG = re.compile(r"<[^>]+>")


def idle_docs() -> Iterator[Document]:
    root = _stdlib()
    names = ["NEWS.txt", "NEWS2x.txt", "HISTORY.txt", "README.txt", "TODO.txt", "extend.txt",
             "CREDITS.txt"]
    for name in names:
        path = root / "idlelib" / name
        if path.exists():
            yield Document(f"idle:{name}", path.read_text(encoding="utf-8", errors="replace"))
    page = root / "idlelib" / "help.html"
    if page.exists():
        raw = page.read_text(encoding="utf-8", errors="replace")
        body = raw.split("<body", 1)[-1]
        text = html.unescape(_TAG.sub("", body))
        text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
        yield Document("idle:help.html", text)
    lic = root / "LICENSE.txt"
    if lic.exists():
        yield Document("python:LICENSE.txt", lic.read_text(encoding="utf-8", errors="replace"))


_READERS = {"pydoc_topics": pydoc_topics, "stdlib_docstrings": stdlib_docstrings,
            "idle_docs": idle_docs}


def is_validation(doc_id: str, val_percent: int) -> bool:
    return zlib.crc32(doc_id.encode("utf-8")) % 100 < val_percent


def drop_shared_passages(train: list[bytes], val: list[bytes], n: int = SHARED_BYTES
                         ) -> list[bytes]:
    """The training documents with every passage of ``n`` bytes or more that also occurs
    in a validation document cut out (the pieces left are kept as documents)."""
    seen = {doc[i:i + n] for doc in val for i in range(len(doc) - n + 1)}
    kept: list[bytes] = []
    for doc in train:
        pieces: list[bytes] = []
        start = 0  # first byte of the piece being kept
        cut_end = 0  # end of the last passage cut out
        for i in range(len(doc) - n + 1):
            if doc[i:i + n] in seen:
                if i >= cut_end:
                    pieces.append(doc[start:i])
                cut_end = i + n
                start = cut_end
        pieces.append(doc[start:])
        kept += [p for p in (piece.strip() for piece in pieces) if p]
    return kept


def load_text_corpus(
    sources: tuple[str, ...] = DEFAULT_SOURCES, val_percent: int = 10
) -> TextCorpus:
    unknown = [s for s in sources if s not in _READERS]
    if unknown:
        raise DataError(f"unknown text sources {unknown}; available: {', '.join(SOURCES)}")
    if not 1 <= val_percent <= 50:
        raise DataError(f"val_percent must be within 1..50, got {val_percent}")
    train: list[bytes] = []
    val: list[bytes] = []
    for source in sources:
        for doc in _READERS[source]():
            data = doc.text.strip().encode("utf-8")
            if data:
                (val if is_validation(doc.id, val_percent) else train).append(data)
    n_train = len(train)
    train = drop_shared_passages(train, val)
    if not train or not val:
        raise DataError(f"text sources {list(sources)} gave too few documents to split")
    train_b = DOC_SEPARATOR.join(train)
    val_b = DOC_SEPARATOR.join(val)
    digest = hashlib.sha256(train_b + b"\0" + val_b).hexdigest()
    return TextCorpus(
        train=np.frombuffer(train_b, dtype=np.uint8),
        val=np.frombuffer(val_b, dtype=np.uint8),
        sha256=digest,
        sources=tuple(sources),
        documents=(n_train, len(val)),
    )


def unigram_entropy_bits(data: np.ndarray) -> float:
    """Entropy of the byte distribution in bits per byte: a model that ignores context."""
    counts = np.bincount(data, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bits_per_byte(mean_nats: float) -> float:
    return mean_nats / math.log(2)
