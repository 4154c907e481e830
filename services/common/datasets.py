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


def file_texts(path: Path) -> Iterator[str]:
    """The text a file contributes: JSON Lines give the strings of each object."""
    text = path.read_text(errors="replace")
    if path.suffix.lower() != ".jsonl":
        yield text
        return
    for line in text.splitlines():
        try:
            yield from _strings(json.loads(line))
        except ValueError:
            yield line


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
            texts = list(file_texts(file))
            self._counts[key] = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
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
