"""Datasets: folders of text under ``dataset/``, their sizes and token counts.

Without a model the token count is an estimate (UTF-8 bytes / 4, a common rule of thumb for
English BPE vocabularies); with ``model`` it is exact, counted with that model's own tokenizer
(``tokenizer.json``, via the ``tokenizers`` library). The answer says which method was used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgellm.schemas import DatasetInfo
from forgellm.services.common.workspace import Workspace

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl", ".json", ".text", ".markdown"}
BYTES_PER_TOKEN = 4
# The longest line of a dataset file the trainer reads (newline included): a longer one is a 400
# naming file:line (services/training/data.py); the catalog leaves it out of its token counts.
MAX_LINE_BYTES = 64 * 1024 * 1024
PIECE_BYTES = 1024 * 1024  # files are read a MiB at a time
CHUNK_BYTES = 1024 * 1024  # text handed to a tokenizer at once


def dataset_files(folder: Path) -> list[Path]:
    """Text files under ``folder``, hidden ones and links leading out of it excluded."""
    root = folder.resolve()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and root in p.resolve().parents)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def read_lines(path: Path, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | bytearray | None]]:
    """(line number, bytes with its newline) of each line of ``path``, read in pieces of a MiB so
    that no more than ``max_bytes`` of one line is ever held. A longer line comes as ``None`` the
    moment it passes the limit (stop there, or go on: its rest is skipped)."""
    with open(path, "rb") as handle:
        number = 0
        while line := handle.readline(PIECE_BYTES):
            number += 1
            if len(line) < PIECE_BYTES or line.endswith(b"\n"):
                yield number, line
                continue
            long: bytearray | None = bytearray(line)  # grown in place: no second copy
            while piece := handle.readline(PIECE_BYTES):
                if long is not None:
                    long += piece
                    if len(long) > max_bytes:
                        long = None
                        yield number, None
                if piece.endswith(b"\n"):
                    break
            if long is not None:
                yield number, long


def file_texts(path: Path) -> Iterator[str]:
    """The text a file contributes: JSON Lines give the strings of each object. Read line by
    line, never whole: text comes in pieces of about ``CHUNK_BYTES`` cut at line ends (a small
    file is one piece), and a line over the trainer's limit (``MAX_LINE_BYTES``) is not counted."""
    jsonl = path.suffix.lower() == ".jsonl"
    pending: list[str] = []
    size = 0
    for _, raw in read_lines(path):
        if raw is None:
            continue
        line = raw.decode("utf-8", errors="replace")
        if not jsonl:
            pending.append(line)
            size += len(raw)
            if size >= CHUNK_BYTES:
                yield "".join(pending)
                pending, size = [], 0
            continue
        line = line.rstrip("\r\n")
        try:
            strings = list(_strings(json.loads(line)))
        except (ValueError, RecursionError):
            strings = [line]
        if "\\ud" in line.lower():  # a lone surrogate escape: not text a tokenizer accepts
            strings = [text.encode("utf-8", "replace").decode("utf-8") for text in strings]
        yield from strings
    if pending:
        yield "".join(pending)


class TokenCounter:
    """Exact counts with a model's tokenizer, cached per (file, size, mtime)."""

    def __init__(self) -> None:
        self._tokenizers: dict[Path, Any] = {}
        self._counts: dict[tuple[str, int, float, str], int] = {}

    def count(self, file: Path, tokenizer_file: Path) -> int:
        stat = file.stat()
        key = (str(file), stat.st_size, stat.st_mtime, str(tokenizer_file))
        if key not in self._counts:
            if tokenizer_file not in self._tokenizers:
                from tokenizers import Tokenizer

                self._tokenizers[tokenizer_file] = Tokenizer.from_file(str(tokenizer_file))
            tokenizer = self._tokenizers[tokenizer_file]
            total, batch, size = 0, [], 0
            for text in file_texts(file):  # encoded in batches of about a MiB: bounded memory
                batch.append(text)
                size += len(text)
                if size >= CHUNK_BYTES:
                    total += sum(len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
                    batch, size = [], 0
            total += sum(len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
            self._counts[key] = total
        return self._counts[key]


def describe_datasets(workspace: Workspace, counter: TokenCounter,
                      tokenizer: tuple[str, Path] | None = None) -> list[DatasetInfo]:
    root = workspace.datasets
    if not root.is_dir():
        return []
    infos = []
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and workspace.contains(p)]
    for folder in sorted(folders):
        files = dataset_files(folder)
        size = sum(f.stat().st_size for f in files)
        if tokenizer is None:
            tokens, method = size // BYTES_PER_TOKEN, f"estimate: UTF-8 bytes / {BYTES_PER_TOKEN}"
        else:
            name, tokenizer_file = tokenizer
            tokens, method = sum(counter.count(f, tokenizer_file) for f in files), f"tokenizer of {name}"
        infos.append(DatasetInfo(name=folder.name, path=workspace.relative(folder), file_count=len(files),
                                 total_size_mb=round(size / 1024**2, 6), estimated_tokens=tokens,
                                 token_method=method))
    return infos
