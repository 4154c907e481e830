"""The training loss, and the environment that makes the worker's memory traffic cheap.

``cross_entropy`` computes the vocabulary softmax once and keeps it for the backward pass;
``mlx.nn.losses.cross_entropy`` computes a logsumexp forward and the softmax again in its VJP.
On SmolLM2 (vocab 49 152) that second pass was 7 % of a training step here (bench/RESULTS.md §6).
Same values and gradients (tested against mlx's own); the kept softmax costs its size in memory
until the backward pass.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Per-position cross entropy (and the softmax, for the backward pass)."""
    top = mx.stop_gradient(logits.max(-1, keepdims=True))
    exp = mx.exp(logits - top)
    total = exp.sum(-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], -1).squeeze(-1)
    return (top + mx.log(total)).squeeze(-1) - picked, exp * mx.reciprocal(total)


@cross_entropy.vjp
def _cross_entropy_vjp(primals: Any, cotangents: Any, outputs: Any) -> tuple[mx.array, mx.array]:
    logits, targets = primals
    scale = cotangents[0][..., None]
    grad = outputs[1] * scale  # softmax · c, then − c at the target
    at_target = mx.take_along_axis(grad, targets[..., None], -1) - scale
    return mx.put_along_axis(grad, targets[..., None], at_target, axis=-1), mx.zeros_like(targets)


def worker_environment() -> dict[str, str]:
    """The training worker's environment: glibc keeps freed memory instead of returning it and
    zeroing fresh pages for every large temporary of every step (~9 % of a step here; −23 %
    together with the loss above). The worker holds its peak memory until it exits."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_MAX_", "0")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "2147483647")
    return env
