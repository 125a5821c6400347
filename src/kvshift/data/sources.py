"""Text sources for ``kvshift data prepare``: the embedded stdlib corpus, local .txt/.jsonl/.parquet files, HF datasets."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STDLIB_SOURCE = "stdlib"
HF_PREFIX = "hf:"
FILE_PREFIX = "file:"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Directories skipped when walking the standard library (only site-packages style dirs: test suites are kept,
# they are about 60% of the ~30 MB corpus and are ordinary Python code).
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One document: ``key`` is a stable identifier (used to assign the train/val split), ``text`` its content."""

    key: str
    text: str


class TextSource:
    """A re-iterable collection of documents; every ``iter(source)`` starts again from the first document."""

    kind: str = "abstract"

    def __iter__(self) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description recorded in meta.json."""
        return {"kind": self.kind}

    def estimated_length(self) -> int | None:
        """Number of raw documents if cheaply known (for progress bars), else None."""
        return None


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


class StdlibSource(TextSource):
    """The ``.py`` files of the running Python's standard library, one document per file.

    Walks ``sysconfig.get_paths()["stdlib"]`` recursively, skipping ``site-packages``, ``dist-packages`` and
    ``__pycache__`` directories (test directories are kept). Files are read in sorted relative-path order and
    decoded as UTF-8 with ``errors="replace"``. The document key is the relative POSIX path.
    """

    kind = "stdlib"

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else stdlib_root()
        if not self.root.is_dir():
            raise FileNotFoundError(f"standard library directory not found: {self.root}")
        self._paths = self._list_files()

    def _list_files(self) -> list[str]:
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
            rel_dir = Path(dirpath).relative_to(self.root)
            found.extend((rel_dir / name).as_posix() for name in filenames if name.endswith(".py"))
        return sorted(found)

    def __iter__(self) -> Iterator[Document]:
        for rel in self._paths:
            data = (self.root / rel).read_bytes()
            yield Document(key=rel, text=data.decode("utf-8", errors="replace"))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "python_version": ".".join(map(str, sys.version_info[:3])),
            "files": len(self._paths),
        }

    def estimated_length(self) -> int:
        return len(self._paths)


def _looks_like_path(source: str) -> bool:
    from ..paths import looks_like_path

    return looks_like_path(source) or source.endswith(SUPPORTED_SUFFIXES) or (os.sep != "/" and os.sep in source)


def _glob_base(pattern: str) -> Path:
    """Longest leading directory of a glob pattern without wildcards."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


STRUCTURED_SUFFIXES = (".jsonl", ".parquet")


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """``rel`` (a posix path relative to the source) matches a glob by its full path or its file name."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _filter(paths: list[Path], base: Path, include: Sequence[str], exclude: Sequence[str]) -> list[Path]:
    out = []
    for p in paths:
        try:
            rel = p.relative_to(base).as_posix()
        except ValueError:
            rel = p.as_posix()
        if include and not _matches(rel, include):
            continue
        if exclude and _matches(rel, exclude):
            continue
        out.append(p)
    return out


def _expand_local(source: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[list[Path], Path]:
    """Resolve a local file, directory or glob into a sorted file list and the base dir used for keys.

    A directory is read recursively in sorted order, skipping hidden files and folders (names starting with
    ``.``, such as ``.git``); ``include`` / ``exclude`` globs filter by relative path or file name.
    """
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        base = _glob_base(expanded)
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no files match the glob {source!r}")
        matches = _filter(matches, base, include, exclude)
        if not matches:
            raise FileNotFoundError(f"no files matched by {source!r} pass --include/--exclude")
        return matches, base
    path = Path(expanded)
    if path.is_dir():
        matches = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not matches:
            raise FileNotFoundError(f"directory {source!r} contains no files")
        matches = _filter(matches, path, include, exclude)
        if not matches:
            raise FileNotFoundError(f"directory {source!r} contains no files that pass --include/--exclude")
        return matches, path
    if path.is_file():
        return [path], path.parent
    raise FileNotFoundError(f"source path does not exist: {source!r}")


def _plain_text(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` for a UTF-8 text file, ``(None, "binary" | "non-UTF-8")`` otherwise."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "non-UTF-8"


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading .parquet sources needs pyarrow; install it with `pip install pyarrow` "
            "(or `pip install kvshift[data]`)"
        ) from exc
    return pq


def _field_value(value: Any, text_field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string")
    return value


class FileSource(TextSource):
    """Local files: ``.jsonl`` = one document per line, ``.parquet`` = one per row, any other file = one
    plain-text document (source code, Markdown, ``.txt``...).

    Plain-text files must be UTF-8 (bytes are read as-is, so ``\\r\\n`` is kept); binary files (a NUL byte in
    the first 8 KiB) and non-UTF-8 files are skipped and counted in ``skipped`` (never mixed in). For
    ``.jsonl`` and ``.parquet`` the document is the string in ``text_field``; blank jsonl lines are skipped.
    Keys are ``<path relative to the source base>`` (text) or ``<relative path>:<line/row number>``.
    """

    kind = "files"

    def __init__(self, source: str, *, text_field: str = "text", include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> None:
        self.source = source
        self.text_field = text_field
        self.include, self.exclude = list(include), list(exclude)
        files, self.base = _expand_local(source, self.include, self.exclude)
        self.skipped: dict[str, int] = {"binary": 0, "non-UTF-8": 0}
        self.files = []
        for path in files:
            if path.suffix not in STRUCTURED_SUFFIXES:
                _, why = _plain_text(path)
                if why is not None:
                    self.skipped[why] += 1
                    continue
            self.files.append(path)
        if not self.files:
            raise ValueError(f"{source!r}: every file was skipped ({self.skipped['binary']} binary, "
                             f"{self.skipped['non-UTF-8']} not UTF-8); nothing to prepare")
        if any(p.suffix == ".parquet" for p in self.files):
            pq = _import_pyarrow_parquet()
            for path in self.files:
                if path.suffix == ".parquet":
                    names = pq.ParquetFile(path).schema_arrow.names
                    if text_field not in names:
                        raise ValueError(
                            f"{path}: parquet file has no text field {text_field!r}; "
                            f"available columns: {names} (choose one with --text-field)"
                        )

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.base).as_posix()
        except ValueError:
            return path.as_posix()

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            rel = self._rel(path)
            if path.suffix == ".jsonl":
                yield from self._iter_jsonl(path, rel)
            elif path.suffix == ".parquet":
                yield from self._iter_parquet(path, rel)
            else:
                text, _ = _plain_text(path)
                if text is not None:  # checked at construction; a file changed since is skipped, not mixed in
                    yield Document(key=rel, text=text)

    def _iter_jsonl(self, path: Path, rel: str) -> Iterator[Document]:
        with open(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
                if self.text_field not in record:
                    raise ValueError(
                        f"{where}: record has no text field {self.text_field!r}; "
                        f"available keys: {sorted(record)} (choose one with --text-field)"
                    )
                text = _field_value(record[self.text_field], self.text_field, where)
                yield Document(key=f"{rel}:{lineno}", text=text)

    def _iter_parquet(self, path: Path, rel: str) -> Iterator[Document]:
        pq = _import_pyarrow_parquet()
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                text = _field_value(value, self.text_field, f"{path} row {row}")
                yield Document(key=f"{rel}:{row}", text=text)
                row += 1

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": len(self.files), "text_field": self.text_field,
                "include": self.include, "exclude": self.exclude,
                "skipped_binary": self.skipped["binary"], "skipped_non_utf8": self.skipped["non-UTF-8"]}


class HFDatasetSource(TextSource):
    """A Hugging Face dataset, loaded with ``datasets.load_dataset(name, config, split=..., streaming=...)``.

    One document per row, taken from ``text_field``; the key is the row index. With ``streaming=True`` the
    dataset is streamed (and streamed again for every pass over it).
    """

    kind = "hf"

    def __init__(
        self,
        name: str,
        *,
        text_field: str = "text",
        config: str | None = None,
        split: str = "train",
        streaming: bool = False,
    ) -> None:
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"{name!r} is not a local path, so it is read as a Hugging Face dataset, which needs the "
                "`datasets` package: `pip install datasets` (or `pip install kvshift[data]`)"
            ) from exc
        self.name = name
        self.text_field = text_field
        self.config = config
        self.split = split
        self.streaming = streaming
        from ..paths import hub_errors, offline_if_unreachable

        with offline_if_unreachable(), hub_errors("--source", name):
            self.dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
        columns = getattr(self.dataset, "column_names", None)
        if columns is not None and text_field not in columns:
            raise ValueError(
                f"Hugging Face dataset {name!r} has no text field {text_field!r}; "
                f"available columns: {list(columns)} (choose one with --text-field)"
            )

    def __iter__(self) -> Iterator[Document]:
        for index, row in enumerate(self.dataset):
            if self.text_field not in row:
                raise ValueError(
                    f"Hugging Face dataset {self.name!r} row {index} has no text field {self.text_field!r}; "
                    f"available keys: {sorted(row)} (choose one with --text-field)"
                )
            text = _field_value(row[self.text_field], self.text_field, f"{self.name} row {index}")
            yield Document(key=str(index), text=text)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }

    def estimated_length(self) -> int | None:
        try:
            return len(self.dataset)
        except TypeError:
            return None


def resolve_source(
    source: str,
    *,
    text_field: str = "text",
    hf_split: str = "train",
    hf_config: str | None = None,
    streaming: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> TextSource:
    """Turn a ``--source`` string into a :class:`TextSource`.

    ``"stdlib"`` is the embedded standard-library corpus; an existing path, a glob, or anything that looks
    like a path (starts with ``/``, ``./``, ``~``... or ends in a supported suffix) is read from disk
    (prefix ``file:`` to force this); anything else is a Hugging Face dataset name (prefix ``hf:`` to force).
    Raises ``FileNotFoundError`` for a missing path / glob without matches, ``ValueError`` for bad input.
    """
    if not source or not source.strip():
        raise ValueError("empty --source")
    if source == STDLIB_SOURCE:
        return StdlibSource()
    if source.startswith(HF_PREFIX):
        return HFDatasetSource(
            source[len(HF_PREFIX) :],
            text_field=text_field,
            config=hf_config,
            split=hf_split,
            streaming=streaming,
        )
    if source.startswith(FILE_PREFIX):
        return FileSource(source[len(FILE_PREFIX) :], text_field=text_field, include=include, exclude=exclude)
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded) or os.path.exists(expanded) or _looks_like_path(source):
        return FileSource(source, text_field=text_field, include=include, exclude=exclude)
    if include or exclude:
        raise ValueError("--include / --exclude filter local files; the source is not a local path")
    return HFDatasetSource(
        source, text_field=text_field, config=hf_config, split=hf_split, streaming=streaming
    )


@dataclass
class DocumentStats:
    """Counters filled in while iterating with :func:`iter_documents`."""

    documents: int = 0
    skipped_empty: int = 0
    bytes: int = 0
    truncated: bool = False


def _utf8(text: str) -> tuple[str, bytes]:
    """Return the text and its UTF-8 bytes, replacing lone surrogates that UTF-8 cannot encode."""
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        data = text.encode("utf-8", errors="replace")
        return data.decode("utf-8"), data


def iter_documents(
    source: TextSource,
    *,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    stats: DocumentStats | None = None,
) -> Iterator[Document]:
    """Iterate the non-empty documents of ``source`` in order.

    Documents that are empty or whitespace-only are skipped (counted in ``stats.skipped_empty``).
    ``max_docs`` caps the number of documents yielded; ``max_bytes`` stops once the UTF-8 size of the yielded
    documents reaches it (the document that crosses the limit is still included).
    """
    stats = stats if stats is not None else DocumentStats()
    if max_docs is not None and max_docs <= 0:
        return
    for doc in source:
        if not doc.text.strip():
            stats.skipped_empty += 1
            continue
        text, data = _utf8(doc.text)
        stats.documents += 1
        stats.bytes += len(data)
        yield doc if text is doc.text else Document(key=doc.key, text=text)
        if (max_docs is not None and stats.documents >= max_docs) or (
            max_bytes is not None and stats.bytes >= max_bytes
        ):
            stats.truncated = True
            return
