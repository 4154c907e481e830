"""Continuous batching with mlx-lm's ``BatchGenerator``: requests join a running batch as they
arrive and leave it when they finish, so concurrent requests share each forward pass instead
of waiting for one another.

``serve_batch`` runs on the MLX thread until nothing is left to do: each step it takes the
requests that arrived (``next_items``), decodes one token for every running sequence, and
hands text to each request (stop strings, cancellation and EOS handled per sequence). Sampling
is per request (temperature, top_p, repetition penalty); a ``seed`` cannot be honoured inside a
shared batch (MLX has one random state), so seeded requests take the one-at-a-time path.
Requests for different per-request adapters (``adapter_bank``) form one batch per adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from forgellm.services.generation.engine import (
    GenerationResult,
    LoadedModel,
    SamplingParams,
    StopFilter,
    logits_processors,
)

log = structlog.get_logger(__name__)

MAX_BATCH = 16  # sequences decoded together
PREFILL_BATCH = 8  # prompts processed together


@dataclass(slots=True)
class BatchItem:
    tokens: list[int]
    params: SamplingParams
    started_at: float  # the caller's clock (time.perf_counter) when the request arrived
    on_text: Callable[[str], None] | None
    on_done: Callable[[GenerationResult], None]
    should_stop: Callable[[], bool]
    adapter: str | None = None  # an ``AdapterBank`` key; None: the model as loaded


@dataclass(slots=True)
class _Sequence:
    item: BatchItem
    detokenizer: Any
    stop_filter: StopFilter
    begin: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    count: int = 0

    def emit(self, text: str) -> None:
        out = self.stop_filter.feed(text)
        if out and self.item.on_text is not None:
            self.item.on_text(out)

    def finish(self, reason: str) -> None:
        if not self.stop_filter.stopped:
            rest = self.stop_filter.flush()
            if rest and self.item.on_text is not None:
                self.item.on_text(rest)
        end = time.perf_counter()
        self.item.on_done(GenerationResult(
            text=self.stop_filter.text, tokens_generated=self.count, prompt_tokens=len(self.item.tokens),
            generation_time_seconds=end - self.begin,
            time_to_first_token=(self.first_token_at or end) - self.item.started_at, finish_reason=reason))


class _Group:
    """The sequences of one adapter choice: a ``BatchGenerator`` of their own (KV caches
    included), stepped with that adapter active."""

    def __init__(self, loaded: LoadedModel, max_batch: int) -> None:
        eos = sorted(loaded.tokenizer.eos_token_ids)
        self.generator = BatchGenerator(loaded.model, stop_tokens=[[t] for t in eos],
                                        completion_batch_size=max_batch,
                                        prefill_batch_size=min(PREFILL_BATCH, max_batch))
        self.active: dict[int, _Sequence] = {}

    def insert(self, loaded: LoadedModel, item: BatchItem) -> None:
        params = item.params
        processors = logits_processors(params)
        (uid,) = self.generator.insert([item.tokens], max_tokens=[params.max_tokens],
                                       samplers=[make_sampler(temp=params.temperature, top_p=params.top_p)],
                                       logits_processors=[processors])
        self.active[uid] = _Sequence(item, loaded.tokenizer.detokenizer, StopFilter(params.stop))

    def step(self) -> None:
        """Decode one token for every sequence; finish the ones that are done."""
        active = self.active
        _, responses = self.generator.next()
        now = time.perf_counter()
        done: dict[int, str] = {}
        for response in responses:
            sequence = active.get(response.uid)
            if sequence is None:
                continue
            if sequence.first_token_at is None:
                sequence.first_token_at = now
            if response.finish_reason == "stop":  # the EOS token itself is not part of the text
                sequence.detokenizer.finalize()
            else:
                sequence.detokenizer.add_token(response.token)
                sequence.count += 1
                if response.finish_reason is not None:
                    sequence.detokenizer.finalize()
            sequence.emit(sequence.detokenizer.last_segment)
            if sequence.stop_filter.stopped:
                done[response.uid] = "stop"
            elif response.finish_reason is not None:
                done[response.uid] = response.finish_reason
        for uid, sequence in active.items():
            if uid not in done and sequence.item.should_stop():
                done[uid] = "cancelled"
        if not done:
            return
        finished_by_generator = {r.uid for r in responses if r.finish_reason is not None}
        still_running = [uid for uid in done if uid not in finished_by_generator]
        if still_running:
            self.generator.remove(still_running)
        for uid, reason in done.items():
            active.pop(uid).finish(reason)


def serve_batch(loaded: LoadedModel, next_items: Callable[[bool], list[BatchItem]], *,
                max_batch: int = MAX_BATCH) -> int:
    """Generate for every item ``next_items(idle)`` hands over until it returns none while idle.
    Returns how many sequences were served. Items naming different adapters (``BatchItem.adapter``,
    keys of ``loaded.bank``) are batched per adapter, each group stepped in turn with its adapter
    active."""
    groups: dict[str | None, _Group] = {}
    served = 0
    try:
        while True:
            items = next_items(not groups)
            if not items and not groups:
                return served
            for item in items:
                group = groups.get(item.adapter)
                if group is None:
                    group = groups[item.adapter] = _Group(loaded, max_batch)
                group.insert(loaded, item)
                served += 1
            bank = loaded.bank  # created by the first request that names an adapter
            for key, group in list(groups.items()):
                if bank is not None:
                    bank.activate(key)
                group.step()
                if not group.active:
                    group.generator.close()
                    del groups[key]
    finally:
        for group in groups.values():  # only on an exception: tell every caller
            for sequence in group.active.values():
                sequence.finish("cancelled")
            group.generator.close()
        if loaded.bank is not None:
            loaded.bank.activate(None)
