"""The demo corpus: docstrings of the Python standard library and the pydoc topics.

Every Python installation carries this text, so the demo models are built without downloading
anything (see ARCHITECTURE.md). Documents are grouped by module *family* (text, data, net, ...)
so federated sites can each hold a different, non-IID part, and a stable hash of each document's
name holds out about 10% of every family for evaluation.

The corpus is a pure function of the Python version: modules are walked in sorted order,
identical docstrings are kept once, and the split uses hashlib, never the salted ``hash()``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Literal

log = logging.getLogger(__name__)

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

TOPICS_FAMILY = "topics"
HELDOUT_PERCENT = 10
MIN_DOC_CHARS = 40

# Module-name prefixes of each family, matched on dotted boundaries ("email" covers
# "email.mime.text"); the longest matching prefix wins.
_FAMILY_PREFIXES: dict[str, tuple[str, ...]] = {
    "text": (
        "codecs", "difflib", "encodings", "fnmatch", "gettext", "locale", "pprint", "re",
        "reprlib", "shlex", "sre_compile", "sre_constants", "sre_parse", "string", "stringprep",
        "textwrap", "unicodedata",
    ),
    "data": (
        "aifc", "array", "audioop", "base64", "binascii", "bz2", "calendar", "chunk",
        "collections", "colorsys", "configparser", "copy", "copyreg", "csv", "dataclasses",
        "datetime", "dbm", "enum", "gzip", "hashlib", "hmac", "imghdr", "json", "lzma",
        "marshal", "netrc", "pickle", "pickletools", "plistlib", "quopri", "shelve", "sndhdr",
        "sqlite3", "struct", "sunau", "tarfile", "tomllib", "uu", "uuid", "wave", "weakref",
        "xdrlib", "zipfile", "zlib", "zoneinfo",
    ),
    "net": (
        "cgi", "cgitb", "email", "ftplib", "html", "http", "imaplib", "ipaddress", "mailbox",
        "mailcap", "mimetypes", "nntplib", "poplib", "pyexpat", "smtpd", "smtplib", "socket",
        "socketserver", "ssl", "telnetlib", "urllib", "webbrowser", "wsgiref", "xml", "xmlrpc",
    ),
    "system": (
        "argparse", "atexit", "cmd", "crypt", "ctypes", "curses", "errno", "fcntl", "filecmp",
        "fileinput", "genericpath", "getopt", "getpass", "glob", "grp", "io", "mmap", "nis",
        "ntpath", "nturl2path", "optparse", "os", "ossaudiodev", "pathlib", "pipes", "platform",
        "posix", "posixpath", "pty", "pwd", "resource", "select", "shutil", "signal", "site",
        "spwd", "stat", "subprocess", "sys", "sysconfig", "syslog", "tempfile", "termios",
        "time", "tty", "venv",
    ),
    "concurrency": (
        "asynchat", "asyncio", "asyncore", "concurrent", "contextvars", "multiprocessing",
        "queue", "sched", "selectors", "threading",
    ),
    "numeric": (
        "bisect", "cmath", "decimal", "fractions", "functools", "graphlib", "heapq",
        "itertools", "math", "numbers", "operator", "random", "secrets", "statistics",
    ),
    "devtools": (
        "abc", "ast", "bdb", "builtins", "cProfile", "code", "codeop", "compileall",
        "contextlib", "dis", "doctest", "faulthandler", "gc", "imp", "importlib", "inspect",
        "keyword", "linecache", "logging", "modulefinder", "opcode", "pdb", "pkgutil",
        "profile", "pstats", "py_compile", "pyclbr", "pydoc", "runpy", "symtable", "tabnanny",
        "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
        "unittest", "warnings", "zipapp", "zipimport",
    ),
}  # fmt: skip

MODULE_FAMILIES: MappingProxyType[str, str] = MappingProxyType(
    {prefix: family for family, prefixes in _FAMILY_PREFIXES.items() for prefix in prefixes}
)
FAMILIES: tuple[str, ...] = (*_FAMILY_PREFIXES, TOPICS_FAMILY)

# Never imported: side effects (this, antigravity), GUI or test baggage, installers.
# readline may write terminal escapes straight to fd 1, which redirect_stdout cannot catch;
# distutils is redirected to setuptools' copy when setuptools is installed, so it is not stdlib.
# pydoc_data holds the topics, read separately.
SKIPPED_MODULES = frozenset({
    "antigravity", "distutils", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "readline",
    "rlcompleter", "test", "this", "tkinter", "turtle", "turtledemo",
})  # fmt: skip
_SKIPPED_PARTS = frozenset({"test", "tests", "idle_test"})
# The ~120 codec tables under encodings share one boilerplate docstring each.
_NO_SUBMODULES = frozenset({"encodings"})
# A repr with an address ("<object at 0x7f...>") differs from run to run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Document:
    """One docstring or pydoc topic; ``text`` starts with its qualified name as a header line."""

    family: str
    name: str
    text: str

    @property
    def split(self) -> Split:
        return "heldout" if is_heldout(self.name) else "train"


def is_heldout(name: str) -> bool:
    """Whether the document called ``name`` is in the held-out split (stable across runs)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def family_of(module: str) -> str | None:
    """The family of a dotted module name (longest prefix wins), or None when none matches."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        family = MODULE_FAMILIES.get(".".join(parts[:end]))
        if family is not None:
            return family
    return None


@dataclass(frozen=True)
class Corpus:
    """Documents grouped by family and split; build it with :func:`load_corpus`."""

    all_documents: tuple[Document, ...]
    _index: dict[tuple[str, Split], tuple[Document, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        index: dict[tuple[str, Split], list[Document]] = {}
        for doc in self.all_documents:
            index.setdefault((doc.family, doc.split), []).append(doc)
        object.__setattr__(self, "_index", {key: tuple(docs) for key, docs in index.items()})

    @property
    def families(self) -> tuple[str, ...]:
        """Families that hold at least one document, in the order of ``FAMILIES``."""
        present = {family for family, _ in self._index}
        return tuple(f for f in (*FAMILIES, *sorted(present - set(FAMILIES))) if f in present)

    def documents(self, family: str | None = None, split: Split = "train") -> list[Document]:
        """Documents of one family (or all, family by family) in one split, in a stable order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if family is not None and family not in self.families:
            raise ValueError(f"unknown family {family!r}; expected one of {self.families}")
        families = self.families if family is None else (family,)
        return [doc for f in families for doc in self._index.get((f, split), ())]

    def texts(self, family: str | None = None, split: Split = "train") -> list[str]:
        """The ``text`` of :meth:`documents`."""
        return [doc.text for doc in self.documents(family, split)]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per family: ``{split}_documents`` and ``{split}_chars`` for both splits."""
        out: dict[str, dict[str, int]] = {}
        for family in self.families:
            row: dict[str, int] = {}
            for split in SPLITS:
                docs = self._index.get((family, split), ())
                row[f"{split}_documents"] = len(docs)
                row[f"{split}_chars"] = sum(len(doc.text) for doc in docs)
            out[family] = row
        return out


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Build the corpus from this interpreter's standard library (cached; about half a second)."""
    start = time.perf_counter()
    # Module docstrings first, then topics, so a module keeps a docstring a topic repeats.
    candidates = sorted(_collect_isolated(), key=lambda d: (d.family == TOPICS_FAMILY, d.name))
    seen: set[str] = set()
    kept: list[Document] = []
    for doc in candidates:
        body = doc.text.split("\n\n", 1)[1]
        # Inherited or re-exported docstrings repeat verbatim; the first name in order keeps it.
        if body not in seen:
            seen.add(body)
            kept.append(doc)
    order = {family: i for i, family in enumerate(FAMILIES)}
    kept.sort(key=lambda doc: (order.get(doc.family, len(order)), doc.family, doc.name))
    corpus = Corpus(tuple(kept))
    log.info(
        "demo corpus: %d documents, %d characters, built in %.2f s",
        len(kept),
        sum(len(doc.text) for doc in kept),
        time.perf_counter() - start,
    )
    return corpus


def _collect_isolated() -> list[Document]:
    """Run :func:`_collect` in a fresh ``python -I -S``.

    In-process, the text would depend on what the caller imported before (torch replaces
    ``inspect.getfile``) and importing ~360 modules would leave their side effects behind;
    ``-I -S`` also keeps site-packages and PYTHON* variables out.
    """
    if not sys.executable:
        log.warning("no sys.executable; building the corpus in-process")
        return _collect()
    proc = subprocess.run(
        [sys.executable, "-I", "-S", __file__], capture_output=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"building the corpus failed (exit {proc.returncode}):\n{tail}")
    return [Document(*row) for row in json.loads(proc.stdout)]


def _collect() -> list[Document]:
    """All candidate documents, before deduplication."""
    return [*_module_documents(), *_topic_documents()]


def _make_document(family: str, name: str, doc: str | None) -> Document | None:
    if not doc or len(doc) < MIN_DOC_CHARS or _ADDRESS.search(doc):
        return None
    return Document(family, name, f"{name}\n\n{doc}")


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        made = _make_document(TOPICS_FAMILY, f"topics.{key}", topics[key].strip())
        if made is not None:
            yield made


def _module_documents() -> Iterator[Document]:
    for module in _stdlib_modules():
        family = family_of(module.__name__)
        if family is None:
            log.debug("no family for %s; dropped", module.__name__)
            continue
        yield from _documents_of_module(family, module)


def _stdlib_modules() -> Iterator[ModuleType]:
    """Public standard-library modules and their submodules that import on this platform."""
    pending = sorted(
        name
        for name in sys.stdlib_module_names
        if not name.startswith("_") and name not in SKIPPED_MODULES
    )
    while pending:
        name = pending.pop(0)
        module = _quiet_import(name)
        if module is None:
            continue
        yield module
        path = getattr(module, "__path__", None)
        if path is not None and name not in _NO_SUBMODULES:
            children = sorted(
                f"{name}.{info.name}"
                for info in pkgutil.iter_modules(path)
                if not info.name.startswith("_") and info.name not in _SKIPPED_PARTS
            )
            # Depth first, so a package's submodules follow it.
            pending[:0] = children


def _quiet_import(name: str) -> ModuleType | None:
    # Some modules print, warn (deprecated ones) or fail on this platform (Windows-only ones).
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        log.debug("skipping %s: %s: %s", name, type(exc).__name__, exc)
        return None


def _owned(obj: object, module: str) -> bool:
    # Objects defined here, or in a private C accelerator (_json, _functools) that a public
    # module re-exports; public re-exports are documented where they are defined.
    owner = getattr(obj, "__module__", None)
    return owner is None or owner == module or owner.split(".")[-1].startswith("_")


def _own_doc(obj: object) -> str | None:
    # inspect.getdoc falls back to a base class's docstring; those repeat, so use only own ones.
    raw = getattr(obj, "__doc__", None)
    if not isinstance(raw, str) or not raw.strip():
        return None
    return inspect.getdoc(obj)


def _documents_of_module(family: str, module: ModuleType) -> Iterator[Document]:
    modname = module.__name__
    made = _make_document(family, modname, _own_doc(module))
    if made is not None:
        yield made
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _owned(obj, modname):
            continue
        qualname = f"{modname}.{name}"
        made = _make_document(family, qualname, _own_doc(obj))
        if made is not None:
            yield made
        if inspect.isclass(obj):
            yield from _documents_of_class(family, qualname, obj)


def _documents_of_class(family: str, qualname: str, cls: type) -> Iterator[Document]:
    for name, attr in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        if inspect.isroutine(attr) or inspect.isdatadescriptor(attr):
            made = _make_document(family, f"{qualname}.{name}", _own_doc(attr))
            if made is not None:
                yield made


def _main() -> None:
    # Child of _collect_isolated: fd 1 goes to /dev/null while modules import, so nothing
    # they print (even from C) can corrupt the JSON written to the saved descriptor.
    out = os.fdopen(os.dup(1), "w", encoding="ascii")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    json.dump([[d.family, d.name, d.text] for d in _collect()], out)
    out.close()


if __name__ == "__main__":
    _main()
