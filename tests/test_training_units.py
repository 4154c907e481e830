"""Pieces of training that need no process: schedules, data splitting/packing, IFT masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forgellm.services.common.errors import ForgeError
from forgellm.services.training.data import (
    BatchOrder,
    Rows,
    load_chat_examples,
    make_batch,
    pack,
    split_documents,
    to_messages,
    tokenize_chat,
)
from forgellm.services.training.schedule import learning_rate_at
from tests.helpers.tiny_lm import write_tiny_model


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 1, 1e-3 * 1 / 10),       # warm-up: linear from 0
        ("cosine", 10, 1e-3),               # end of warm-up: the peak
        ("cosine", 55, 1e-3 * 0.55),        # half way: floor + (1 - floor) / 2
        ("cosine", 100, 1e-4),              # the end: the 10 % floor
        ("linear", 55, 1e-3 * 0.55),
        ("linear", 100, 1e-4),
        ("constant", 1, 1e-4),
        ("constant", 99, 1e-3),
    ],
)
def test_learning_rate_schedules(schedule, step, expected):
    got = learning_rate_at(step, peak=1e-3, schedule=schedule, warmup_steps=10, max_iterations=100)
    assert got == pytest.approx(expected)


def test_cosine_is_monotone_after_warmup():
    values = [learning_rate_at(s, peak=1.0, schedule="cosine", warmup_steps=5, max_iterations=50)
              for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_documents_split_never_share_a_document():
    docs = [(f"d{i}", f"document number {i}") for i in range(20)]
    train, valid = split_documents(docs, 0.2, seed=3)
    assert len(valid) == 4 and len(train) == 16 and not set(train) & set(valid)
    assert split_documents(docs, 0.2, seed=3) == (train, valid)  # seeded
    with pytest.raises(ForgeError, match="at least two"):
        split_documents([("a", "only one paragraph")], 0.1, seed=0)


def test_packing_wastes_nothing():
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8]], seq_length=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # 7 8 0 is a partial row: dropped
    inputs, targets, mask = make_batch(Rows.packed(rows), [1, 0])
    assert inputs.tolist() == [[4, 5, 0], [1, 2, 3]] and targets.tolist() == [[5, 0, 6], [2, 3, 0]]
    assert mask.sum() == 6


def test_batch_order_is_a_pure_function_of_the_iteration():
    order = BatchOrder(10, 4, seed=7)
    first = [order.indices(i) for i in range(1, 8)]
    again = BatchOrder(10, 4, seed=7)
    assert [again.indices(i) for i in (7, 3, 1)] == [first[6], first[2], first[0]]
    epoch0 = first[0] + first[1] + first[2][:2]
    assert sorted(epoch0) == list(range(10))  # every row once per epoch


@pytest.mark.parametrize(
    "line",
    [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "hi", "completion": "hello"},
        {"instruction": "hi", "input": "", "output": "hello"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ],
)
def test_every_ift_format_becomes_the_same_chat(line):
    assert to_messages(line, "f:1") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_a_bad_ift_line_names_file_and_line(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    good = json.dumps({"prompt": "a", "completion": "b"})
    (folder / "data.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(ForgeError, match=r"chat/data.jsonl:3: invalid JSON"):
        load_chat_examples(folder)
    (folder / "data.jsonl").write_text(f'{good}\n{{"messages": [{{"role": "user", "content": "x"}}]}}\n')
    with pytest.raises(ForgeError, match=r"chat/data.jsonl:2: no assistant message"):
        load_chat_examples(folder)


def test_ift_mask_covers_only_assistant_tokens(tmp_path):
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(write_tiny_model(tmp_path / "tiny")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the heron?"},
                {"role": "assistant", "content": "At the estuary."}, {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "At dawn."}]
    ids, mask = tokenize_chat(tokenizer, messages)
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned == "At the estuary.<|im_end|>\nAt dawn.<|im_end|>\n"
    ignored = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Where is the heron?" in ignored and "Be brief." in ignored and "estuary" not in ignored
    rows = Rows.chats([(ids, mask)], max_seq_length=512)
    _, targets, target_mask = make_batch(rows, [0])
    assert tokenizer.decode(targets[0][target_mask[0] > 0].tolist()) == learned
    assert np.array_equal(rows.masks[0], np.asarray(mask, np.float32))


def test_our_cross_entropy_matches_mlx_in_value_and_gradient():
    import mlx.core as mx
    import mlx.nn as nn

    from forgellm.services.training.losses import cross_entropy

    mx.random.seed(3)
    logits = mx.random.normal((2, 5, 50)) * 4
    targets = mx.random.randint(0, 50, (2, 5))
    weights = mx.random.uniform(shape=(2, 5))

    def ours(x):
        return (cross_entropy(x, targets)[0] * weights).sum()

    def theirs(x):
        return (nn.losses.cross_entropy(x, targets) * weights).sum()

    assert mx.allclose(ours(logits), theirs(logits), atol=1e-4).item()
    assert mx.allclose(mx.grad(ours)(logits), mx.grad(theirs)(logits), atol=1e-5).item()
