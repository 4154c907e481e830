"""Malformed datasets against a running trainer: every one is a clear 400 (naming file:line where a
line is at fault) or its file is skipped with a warning in the start reply, and the trainer service
never crashes (same pid, status answers) nor holds a huge file in memory.

A single line over the limit (64 MiB, ``services/training/data.py`` MAX_LINE_BYTES) is refused
after reading at most that much: CI checks a 100 MB line; the 1 GB line of the issue runs under
the ``slow`` marker.
"""

from __future__ import annotations

import codecs
import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers.procs import Platform, http, poll, running_platform
from tests.helpers.tiny_lm import corpus_sentences, write_tiny_model

MB = 1024 * 1024
START = {"model_name": "tiny", "max_iterations": 3, "batch_size": 1, "max_seq_length": 16, "steps_per_report": 1}
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "Where is the heron?"},
                                     {"role": "assistant", "content": "At the estuary."}]})
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def write_huge_line(path: Path, size: int, prefix: bytes = b"") -> None:
    """One line of ``size`` bytes and no newline, written in 8 MiB blocks (fast, and really on disk)."""
    block = b"a" * (8 * MB)
    with open(path, "wb") as handle:
        handle.write(prefix)
        left = size - len(prefix)
        while left > 0:
            handle.write(block[:left])
            left -= len(block)


# name -> (training type, files, expected): expected is ("400", [substrings of the error]) or
# ("skipped", [substrings of the warnings]) for a dataset that still has good files.
CASES: dict[str, tuple[str, dict[str, bytes | str], tuple[str, list[str]]]] = {
    "no-files": ("cpt", {}, ("400", ["No text documents"])),
    "empty-files": ("cpt", {"a.txt": "", "b.md": "  \n\n\t\n", "c.jsonl": "\n\n"},
                    ("400", ["a.txt: skipped (empty)", "b.md: skipped (empty)", "c.jsonl: skipped (empty)"])),
    "empty-ift": ("ift", {"a.jsonl": ""}, ("400", ["at least two", "a.jsonl: skipped (empty)"])),
    "binary-txt": ("cpt", {"image.txt": PNG}, ("400", ["image.txt: skipped (binary)"])),
    "binary-jsonl": ("ift", {"blob.jsonl": b"\x00\x01\x02" * 100}, ("400", ["blob.jsonl: skipped (binary)"])),
    "nul-after-probe": ("cpt", {"late.txt": "text\n" * 4000 + "\x00 hidden\n"},
                        ("400", ["late.txt: skipped (binary (a NUL byte on line 4001))"])),
    "utf16": ("cpt", {"wide.txt": codecs.BOM_UTF16_LE + "Tides rise twice a day.".encode("utf-16-le")},
              ("400", ["wide.txt: skipped (UTF-16 text"])),
    "latin1-txt": ("cpt", {"latin.txt": "caf\u00e9 au lait\n".encode("latin-1")},
                   ("400", ["latin.txt: skipped (not UTF-8 (line 1, byte 4))"])),
    "latin1-jsonl": ("ift", {"x.jsonl": (GOOD_CHAT + "\n").encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")},
                     ("400", ["x.jsonl:2: not valid UTF-8"])),
    "broken-jsonl": ("ift", {"x.jsonl": f"{GOOD_CHAT}\n{GOOD_CHAT}\n{{not json\n"},
                     ("400", ["x.jsonl:3: invalid JSON"])),
    "truncated-jsonl": ("ift", {"x.jsonl": f'{GOOD_CHAT}\n{GOOD_CHAT}\n{{"prompt": "a", "compl'},
                        ("400", ["x.jsonl:3: invalid JSON"])),
    "blank-lines-counted": ("ift", {"x.jsonl": f"{GOOD_CHAT}\n\n\n{{oops\n"}, ("400", ["x.jsonl:4: invalid JSON"])),
    "not-an-object": ("ift", {"x.jsonl": f"{GOOD_CHAT}\n[1, 2]\n"}, ("400", ["x.jsonl:2: expected a JSON object"])),
    "cpt-jsonl-without-text": ("cpt", {"x.jsonl": '{"content": "no text field"}\n'},
                               ("400", ['x.jsonl:1: expected an object with a "text" string'])),
    "cpt-jsonl-text-not-string": ("cpt", {"x.jsonl": '{"text": ["a", "b"]}\n'},
                                  ("400", ['x.jsonl:1: expected an object with a "text" string'])),
    "wrong-message-types": ("ift", {"x.jsonl": f'{GOOD_CHAT}\n{{"messages": "hi"}}\n'},
                            ("400", ['x.jsonl:2: "messages" must be a list'])),
    "unknown-role": ("ift", {"x.jsonl": '{"messages": [{"role": "wizard", "content": "x"}]}\n'},
                     ("400", ["x.jsonl:1:"])),
    "no-assistant": ("ift", {"x.jsonl": '{"messages": [{"role": "user", "content": "x"}]}\n'},
                     ("400", ["x.jsonl:1: no assistant message"])),
    "deep-nesting": ("ift", {"x.jsonl": "[" * 200_000 + "]" * 200_000 + "\n"},
                     ("400", ["x.jsonl:1: invalid JSON"])),
    "huge-integer": ("cpt", {"x.jsonl": '{"text": "a", "n": ' + "9" * 5000 + "}\n"},
                     ("400", ["x.jsonl:1: invalid JSON"])),
    "lone-surrogate": ("ift", {"x.jsonl": '{"prompt": "a\\ud800b", "completion": "c"}\n'},
                       ("400", ["x.jsonl:1: a lone UTF-16 surrogate"])),
    "huge-line-txt": ("cpt", {"big.txt": None}, ("400", ["big.txt:1: line longer than 64 MiB"])),
    "huge-line-jsonl": ("ift", {"big.jsonl": None}, ("400", ["big.jsonl:1: line longer than 64 MiB"])),
}
HUGE = 100 * 1000 * 1000  # 100 MB: over the 64 MiB limit


@pytest.fixture(scope="module")
def trainer():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name) / "ws"
        write_tiny_model(home / "models" / "base" / "tiny")
        data = home / "dataset"
        for case, (_, files, _) in CASES.items():
            folder = data / case
            folder.mkdir(parents=True)
            for file, content in files.items():
                if content is None:
                    write_huge_line(folder / file, HUGE, b'{"text": "' if file.endswith(".jsonl") else b"")
                elif isinstance(content, bytes):
                    (folder / file).write_bytes(content)
                else:
                    (folder / file).write_text(content)
        mixed = data / "mixed"  # good files beside bad ones: a run starts, the bad ones are named
        mixed.mkdir()
        sentences = corpus_sentences(60)
        (mixed / "good.txt").write_text(" ".join(sentences[:30]) + "\n\n" + " ".join(sentences[30:]) + "\n")
        (mixed / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + "".join(
            json.dumps({"text": s}) + "\r\n" for s in sentences[:10]).encode())
        (mixed / "separators.jsonl").write_text(  # U+2028 inside a string is valid JSON, not a line break
            json.dumps({"text": "one\u2028two\u0085three"}, ensure_ascii=False) + "\n")
        (mixed / "image.txt").write_bytes(PNG)
        (mixed / "empty.md").write_text("")
        (mixed / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
        (Path(name) / "secret.txt").write_text("outside the dataset")
        os.symlink(Path(name) / "secret.txt", mixed / "link.txt")
        os.symlink(mixed / "loop.txt", mixed / "loop.txt")  # a link to itself
        os.mkfifo(mixed / "pipe.txt")  # opening it would block forever: never opened
        (mixed / "folder.txt").mkdir()
        with running_platform(home) as platform:
            yield platform


def trainer_pid(platform: Platform) -> int:
    return platform.pid_of("trainer")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def first_pid(trainer):
    return trainer_pid(trainer), peak_rss_mb(trainer_pid(trainer))


def status(platform: Platform) -> dict:
    code, body, _ = http("GET", platform.web + "/api/training/status", timeout=5)
    assert code == 200, body
    return body


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_dataset_is_a_clear_400(trainer, first_pid, case):
    training_type, _, (kind, needles) = CASES[case]
    code, body, _ = http("POST", trainer.web + "/api/training/start",
                         {**START, "dataset": case, "training_type": training_type}, timeout=120)
    assert kind == "400"
    assert code == 400, body
    assert body["success"] is False and body["error_code"] == "INVALID_REQUEST"
    assert body["details"]["field"] == "dataset" and body["suggestion"]
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    assert status(trainer)["is_training"] is False
    assert trainer_pid(trainer) == first_pid[0], "the trainer service restarted"


def test_bad_files_beside_good_ones_are_skipped_with_warnings(trainer, first_pid):
    code, body, _ = http("POST", trainer.web + "/api/training/start", {**START, "dataset": "mixed"}, timeout=120)
    assert code == 200, body
    try:
        warnings = body["warnings"]
        assert sorted(warnings) == [
            "mixed/empty.md: skipped (empty)",
            "mixed/image.txt: skipped (binary)",
            "mixed/latin.txt: skipped (not UTF-8 (line 1, byte 4))",
            "mixed/link.txt: skipped (a link leading out of the dataset folder)",
        ], warnings
        assert "4 dataset file(s) skipped" in body["message"]
        # The worker reads the same files (and skips the same ones) and trains.
        poll(lambda: status(trainer), lambda s: s["current_iteration"] >= 1 or not s["is_training"], 120,
             "the first iteration", 0.2)
    finally:
        http("POST", trainer.web + "/api/training/stop")
        poll(lambda: status(trainer), lambda s: not s["is_training"], 120, "the run to end", 0.2)
    final = status(trainer)
    assert final.get("error") is None, final  # the worker read the same files without failing
    assert trainer_pid(trainer) == first_pid[0]


def test_a_stop_while_the_worker_starts_is_a_stop_not_an_error(trainer, first_pid):
    """Stop at once after start: the SIGTERM reaches the worker before it set its handler. Found
    here (the mixed run above used to be stopped this way): it was reported as a killed worker."""
    code, body, _ = http("POST", trainer.web + "/api/training/start", {**START, "dataset": "mixed"}, timeout=120)
    assert code == 200, body
    http("POST", trainer.web + "/api/training/stop")
    final = poll(lambda: status(trainer), lambda s: not s["is_training"], 120, "the run to end", 0.2)
    assert final["phase"] == "stopped" and final.get("error") is None, final


def test_dataset_info_survives_every_bad_dataset(trainer, first_pid):
    """The catalog counts tokens with the model's tokenizer, line by line: no crash, no slurp."""
    catalog = trainer.pid_of("catalog")
    code, body, _ = http("GET", trainer.web + "/api/dataset/info?model=tiny", timeout=120)
    assert code == 200, body
    names = {d["name"]: d for d in body["datasets"]}
    assert set(CASES) - {"no-files"} <= set(names) and names["mixed"]["estimated_tokens"] > 0
    assert trainer.pid_of("catalog") == catalog


def test_the_trainer_never_held_a_huge_file(trainer, first_pid):
    """After the 100 MB lines, the trainer's peak memory grew by far less than the file (it reads at
    most one 64 MiB line, and only to refuse it)."""
    grown = peak_rss_mb(trainer_pid(trainer)) - first_pid[1]
    assert grown < 150, f"trainer peak RSS grew by {grown:.0f} MB"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_1gb_single_line_is_refused_without_reading_it_all(tmp_path):
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name) / "ws"
        write_tiny_model(home / "models" / "base" / "tiny")
        for kind, file in (("cpt", "big.txt"), ("ift", "big.jsonl")):
            (home / "dataset" / kind).mkdir(parents=True)
            write_huge_line(home / "dataset" / kind / file, 1024 * MB,
                            b'{"prompt": "' if file.endswith(".jsonl") else b"")
        with running_platform(home) as platform:
            pid = platform.pid_of("trainer")
            before = peak_rss_mb(pid)
            for kind, file in (("cpt", "big.txt"), ("ift", "big.jsonl")):
                code, body, _ = http("POST", platform.web + "/api/training/start",
                                     {**START, "dataset": kind, "training_type": kind}, timeout=300)
                assert code == 400 and f"{kind}/{file}:1: line longer than 64 MiB" in body["error"], body
            code, body, _ = http("GET", platform.web + "/api/dataset/info?model=tiny", timeout=300)
            assert code == 200, body
            assert platform.pid_of("trainer") == pid and status(platform)["is_training"] is False
            grown = peak_rss_mb(pid) - before
            assert grown < 150, f"trainer peak RSS grew by {grown:.0f} MB for a 1 GB line"
