"""Training data: read, validate, split, tokenize, pack, batch.

CPT: raw text documents (.txt .md .rst, JSON Lines with "text"), split into train/valid by
document (no document is in both), tokenized with the model's tokenizer and packed into rows of
``max_seq_length + 1`` tokens (inputs and shifted targets) with an EOS between documents: no
padding at all. IFT: JSON Lines in chat (``messages``), prompt/completion, Alpaca
(instruction/input/output) or ShareGPT (``conversations`` with from/value) form, rendered with
the model's chat template; the loss covers only the assistant tokens. Batches are a pure
function of (seed, iteration), so a resumed run sees exactly the batches an uninterrupted one
would have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from forgellm.schemas import ErrorCode
from forgellm.services.common.datasets import MAX_LINE_BYTES, read_lines
from forgellm.services.common.errors import ForgeError

log = structlog.get_logger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown"}
JSONL_SUFFIXES = {".jsonl"}
BINARY_PROBE_BYTES = 8192  # a NUL byte in a file's first 8 KiB: a binary file, skipped
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _bad(where: str, why: str) -> ForgeError:
    return ForgeError(ErrorCode.INVALID_REQUEST, f"{where}: {why}", details={"field": "dataset", "where": where},
                      suggestion="Fix or remove that line; see the supported formats in the README.")


def _skip(warnings: list[str] | None, path: Path, rel: str, reason: str) -> None:
    """A file left out of the dataset: logged, and told to the caller (the start reply) too."""
    log.warning("file_skipped", file=str(path), reason=reason)
    if warnings is not None:
        warnings.append(f"{rel}: skipped ({reason})")


def _files(folder: Path, suffixes: set[str], warnings: list[str] | None = None) -> list[Path]:
    """The dataset's files, hidden ones left out, and a link leading out of the folder skipped
    with a warning (never read: the dataset may only use what lies inside it)."""
    root = folder.resolve()
    files = []
    for p in sorted(folder.rglob("*")):
        if (not p.is_file() or p.suffix.lower() not in suffixes
                or any(part.startswith(".") for part in p.relative_to(folder).parts)):
            continue
        if root not in p.resolve().parents:
            _skip(warnings, p, str(p.relative_to(folder.parent)), "a link leading out of the dataset folder")
            continue
        files.append(p)
    return files


def _probe(path: Path, rel: str, warnings: list[str] | None) -> bool:
    """Whether the file can be read as text at all (readable, not binary, not UTF-16)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(BINARY_PROBE_BYTES)
    except OSError as exc:
        _skip(warnings, path, rel, f"cannot be read: {exc.strerror}")
        return False
    if head.startswith(_UTF16_BOMS):
        _skip(warnings, path, rel, "UTF-16 text: save it as UTF-8")
        return False
    if b"\x00" in head:
        _skip(warnings, path, rel, "binary")
        return False
    return True


def _lines(path: Path, rel: str) -> Iterator[tuple[int, bytes | bytearray]]:
    """(line number, bytes) of each line, streamed: a line over the limit is refused once
    MAX_LINE_BYTES of it are read, holding about that much and no more."""
    for number, line in read_lines(path, MAX_LINE_BYTES):
        if line is None:
            raise _bad(f"{rel}:{number}", f"line longer than {MAX_LINE_BYTES // 2**20} MiB (the limit per line)")
        yield number, line


def _read_text(path: Path, rel: str, warnings: list[str] | None = None, *, keep: bool = True) -> str | None:
    """The file's text (``keep=False``: "" once checked, nothing held), or None when it is
    skipped with a warning: binary, not UTF-8, UTF-16, unreadable or empty."""
    if not _probe(path, rel, warnings):
        return None
    parts: list[str] = []
    has_text = False
    try:
        for number, raw in _lines(path, rel):
            if b"\x00" in raw:
                _skip(warnings, path, rel, f"binary (a NUL byte on line {number})")
                return None
            try:  # a line ends at b"\n", which never splits a UTF-8 sequence
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _skip(warnings, path, rel, f"not UTF-8 (line {number}, byte {exc.start + 1})")
                return None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            has_text = has_text or bool(line.strip())
            if keep:
                parts.append(line)
    except OSError as exc:
        _skip(warnings, path, rel, f"cannot be read: {exc.strerror}")
        return None
    if not has_text:
        _skip(warnings, path, rel, "empty")
        return None
    return "".join(parts)


def _surrogate_free(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl(path: Path, rel: str, warnings: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(file:line, object) for each non-blank line; a bad line is a 400 naming file:line."""
    if not _probe(path, rel, warnings):
        return
    seen = False
    for number, raw in _lines(path, rel):
        where = f"{rel}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(where, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        seen = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(where, f"invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise _bad(where, "invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise _bad(where, f"invalid JSON ({exc})") from None
        if "\\ud" in line.lower() and not _surrogate_free(obj):
            raise _bad(where, "a lone UTF-16 surrogate escape (\\udXXX) is not text")
        yield where, obj
    if not seen:
        _skip(warnings, path, rel, "empty")


def _skipped(warnings: list[str] | None) -> str:
    return f" (skipped: {'; '.join(warnings)})" if warnings else ""


# --- CPT ------------------------------------------------------------------------------------


def iter_documents(folder: Path, warnings: list[str] | None = None, *, texts: bool = True
                   ) -> Iterator[tuple[str, str]]:
    """(where, text) for every document; a .jsonl line with "text" is one document. Skipped
    files are appended to ``warnings``. ``texts=False`` checks without keeping a file's text (a
    plain text document then comes as "")."""
    for path in _files(folder, TEXT_SUFFIXES | JSONL_SUFFIXES, warnings):
        rel = str(path.relative_to(folder.parent))
        if path.suffix.lower() in JSONL_SUFFIXES:
            for where, obj in _jsonl(path, rel, warnings):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise _bad(where, 'expected an object with a "text" string')
                if obj["text"].strip():
                    yield where, obj["text"]
        else:
            text = _read_text(path, rel, warnings, keep=texts)
            if text is not None:
                yield rel, text


def load_documents(folder: Path, warnings: list[str] | None = None) -> list[tuple[str, str]]:
    return list(iter_documents(folder, warnings))


def no_documents(folder: Path, warnings: list[str] | None) -> ForgeError:
    return ForgeError(ErrorCode.INVALID_REQUEST, f"No text documents in dataset '{folder.name}'{_skipped(warnings)}",
                      details={"field": "dataset", "skipped": list(warnings or [])},
                      suggestion="CPT reads .txt .md .rst files and .jsonl lines with a \"text\" field, in UTF-8.")


def split_documents(docs: list[tuple[str, str]], validation_split: float, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Split by document (never one document in both). A dataset of one document is split by
    paragraphs first, so it still gets a held-out part."""
    texts = [text for _, text in docs]
    if len(texts) == 1:
        texts = [p for p in texts[0].split("\n\n") if p.strip()]
    if len(texts) < 2:
        raise ForgeError(ErrorCode.INVALID_REQUEST, "The dataset needs at least two documents (or paragraphs)",
                         details={"field": "dataset"}, suggestion="Add more text to the dataset folder.")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_valid = min(len(texts) - 1, max(1, math.ceil(len(texts) * validation_split)))
    valid = [texts[i] for i in order[:n_valid]]
    train = [texts[i] for i in order[n_valid:]]
    return train, valid


def pack(token_lists: list[list[int]], seq_length: int, eos_id: int | None) -> np.ndarray:
    """Concatenate documents (EOS between them) and cut rows of ``seq_length + 1`` tokens; a
    final partial row is dropped unless it is the only one."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if eos_id is not None:
            stream.append(eos_id)
    width = seq_length + 1
    rows = len(stream) // width
    if rows == 0:
        return np.asarray([stream], dtype=np.int32) if len(stream) > 1 else np.zeros((0, width), np.int32)
    return np.asarray(stream[: rows * width], dtype=np.int32).reshape(rows, width)


# --- IFT ------------------------------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "system": "system"}


def to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    """One example in any supported form → chat messages."""
    if not isinstance(obj, dict):
        raise _bad(where, "expected a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in _ROLES
                for m in messages):
            raise _bad(where, '"messages" must be a list of {role: system|user|assistant, content: string}')
        out = [{"role": _ROLES[m["role"]], "content": m["content"]} for m in messages]
    elif "conversations" in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in _ROLES for t in turns):
            raise _bad(where, '"conversations" must be a list of {from: human|gpt|system, value: string}')
        out = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in turns]
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise _bad(where, '"prompt" and "completion" must be strings')
        out = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    elif "instruction" in obj and "output" in obj:
        if not all(isinstance(obj.get(k, ""), str) for k in ("instruction", "input", "output")):
            raise _bad(where, '"instruction", "input" and "output" must be strings')
        prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    else:
        raise _bad(where, "unknown format: expected messages, conversations, prompt/completion or "
                          "instruction/output")
    if not any(m["role"] == "assistant" for m in out):
        raise _bad(where, "no assistant message to learn from")
    return out


def iter_chat_examples(folder: Path, warnings: list[str] | None = None
                       ) -> Iterator[tuple[str, list[dict[str, str]]]]:
    for path in _files(folder, JSONL_SUFFIXES, warnings):
        for where, obj in _jsonl(path, str(path.relative_to(folder.parent)), warnings):
            yield where, to_messages(obj, where)


def too_few_examples(warnings: list[str] | None) -> ForgeError:
    return ForgeError(ErrorCode.INVALID_REQUEST, f"An IFT dataset needs at least two JSON Lines examples"
                      f"{_skipped(warnings)}", details={"field": "dataset", "skipped": list(warnings or [])},
                      suggestion="Put chat examples in .jsonl files (UTF-8).")


def load_chat_examples(folder: Path, warnings: list[str] | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    examples = list(iter_chat_examples(folder, warnings))
    if len(examples) < 2:
        raise too_few_examples(warnings)
    return examples


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))
    # A tokenizer without a chat template (a base model): a plain, documented layout.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    if generation_prompt:
        text += "Assistant:"
    return list(tokenizer.encode(text))


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask marking the assistant tokens."""
    ids = _render(tokenizer, messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], False))
        for k in range(start, min(end, len(ids))):
            mask[k] = 1
    return ids, mask


# --- rows and batches -------------------------------------------------------------------------


@dataclass(slots=True)
class Rows:
    """Token rows; ``masks[i][k]`` says whether token k of row i is a target to learn."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def packed(cls, matrix: np.ndarray) -> Rows:
        return cls([row for row in matrix], [np.ones(len(row), np.float32) for row in matrix])

    @classmethod
    def chats(cls, tokenized: list[tuple[list[int], list[int]]], max_seq_length: int) -> Rows:
        ids, masks = [], []
        for tokens, mask in tokenized:
            tokens, mask = tokens[: max_seq_length + 1], mask[: max_seq_length + 1]
            if len(tokens) >= 2 and any(mask[1:]):
                ids.append(np.asarray(tokens, np.int32))
                masks.append(np.asarray(mask, np.float32))
        return cls(ids, masks)


class BatchOrder:
    """Which rows make batch ``iteration``: epochs of seeded permutations, laid end to end."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        if n_rows == 0:
            raise ForgeError(ErrorCode.INVALID_REQUEST, "No training rows: the dataset is too small for the "
                             "sequence length", details={"field": "dataset"},
                             suggestion="Add data or lower max_seq_length.")
        self.n, self.batch_size, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed * 1_000_003 + epoch).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, iteration: int) -> list[int]:
        start = (iteration - 1) * self.batch_size
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + self.batch_size)]

    def epoch_of(self, iteration: int) -> float:
        return (iteration * self.batch_size) / self.n


def make_batch(rows: Rows, indices: list[int], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, target mask), padded to the longest row of the batch."""
    width = max(len(rows.ids[i]) for i in indices) - 1
    inputs = np.full((len(indices), width), pad_id, np.int32)
    targets = np.full((len(indices), width), pad_id, np.int32)
    mask = np.zeros((len(indices), width), np.float32)
    for b, i in enumerate(indices):
        ids, m = rows.ids[i], rows.masks[i]
        n = len(ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        mask[b, :n] = m[1:]
    return inputs, targets, mask


def input_token_count(rows: Rows, indices: list[int]) -> int:
    """Real (unpadded) tokens the model processes for these rows: what tokens/s counts."""
    return sum(len(rows.ids[i]) - 1 for i in indices)
