"""Several LoRA adapters on one loaded base model, chosen per request, without reloading it.

The first request that names an adapter (``GenerateRequest.adapter``) wraps each linear layer an
adapter touches in a ``SwitchedLinear``: it computes the base layer and adds the delta of the
*active* adapter, ``scale · (x @ A) @ B`` (what mlx-lm's ``LoRALinear`` computes), or nothing.
The bank keeps each adapter's A and B matrices (a few MB for a small rank) and switches between
them by setting ``active`` before a forward pass; the continuous batcher runs one batch per
adapter and switches before each step (``batching.serve_batch``).

``NO_ADAPTER`` asks for the bare base model even when the model was loaded with an adapter
(``adapter_path``): the load-time LoRA layers are wrapped too, and bypassed while it is active.
A fully fine-tuned (``fine_tune_type: full``) load-time adapter is merged into the weights and
cannot be bypassed; DoRA adapters change the weights' norm and are only applied at load time.

MLX thread only, like everything that touches the model.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError
from forgellm.services.generation.adapters import NO_ADAPTER, AdapterChoice

log = structlog.get_logger(__name__)

MAX_ADAPTERS = 8  # kept in memory at once; the least recently used one is dropped beyond that
_LOAD_TIME_LORA = (LoRALinear, DoRALinear)


def _dims(linear: Any) -> tuple[int, int]:
    """(input, output) dimensions of a Linear or QuantizedLinear layer."""
    out_dims = linear.weight.shape[0]
    if isinstance(linear, nn.QuantizedLinear):
        return linear.scales.shape[-1] * linear.group_size, out_dims
    return linear.weight.shape[1], out_dims


class SwitchedLinear(nn.Module):
    """A linear layer plus the delta of whichever adapter the bank has active."""

    def __init__(self, inner: nn.Module, path: str, bank: AdapterBank) -> None:
        super().__init__()
        self.inner = inner  # Linear, QuantizedLinear, or a load-time LoRALinear/DoRALinear
        self._path = path
        self._bank = bank

    def __call__(self, x: mx.array) -> mx.array:
        bank = self._bank
        if bank.active is None:
            return self.inner(x)  # the model as loaded
        base = self.inner.linear if isinstance(self.inner, _LOAD_TIME_LORA) else self.inner
        y = base(x)
        delta = bank.deltas.get(self._path)
        if delta is None:
            return y
        a, b, scale = delta
        return y + (scale * ((x @ a) @ b)).astype(x.dtype)


class AdapterBank:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active: str | None = None  # None: the model as loaded; else an adapter key
        self.deltas: dict[str, tuple[mx.array, mx.array, float]] = {}  # of the active adapter
        self._adapters: OrderedDict[str, dict[str, tuple[mx.array, mx.array, float]]] = OrderedDict()
        self._switched: dict[str, SwitchedLinear] = {}
        self._load_time_full = False
        for path, module in list(model.named_modules()):
            if isinstance(module, _LOAD_TIME_LORA):
                self._wrap(path, module)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def ensure(self, choice: AdapterChoice | None, loaded_adapter: AdapterChoice | None = None) -> str:
        """The key of ``choice`` (loading its weights if new); ``None`` means ``NO_ADAPTER``."""
        if choice is None:
            if loaded_adapter is not None and self._is_full(loaded_adapter):
                raise ForgeError(ErrorCode.INVALID_REQUEST,
                                 "The loaded adapter is a full fine-tune merged into the weights: it cannot be "
                                 "bypassed per request", details={"field": "adapter"},
                                 suggestion="Load the base model without adapter_path to compare with it.")
            self._adapters.setdefault(NO_ADAPTER, {})
            return NO_ADAPTER
        stat = choice.weights.stat()
        key = f"{choice.weights}@{stat.st_mtime_ns}"
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return key
        deltas = self._read(choice)
        self._adapters[key] = deltas
        while len(self._adapters) > MAX_ADAPTERS:
            dropped, _ = self._adapters.popitem(last=False)
            log.info("adapter_dropped", adapter=dropped, reason="least recently used")
        log.info("adapter_ready", adapter=choice.note, layers=len(deltas), kept=len(self._adapters))
        return key

    def activate(self, key: str | None) -> None:
        self.active = key
        self.deltas = self._adapters.get(key, {}) if key is not None else {}

    @contextmanager
    def using(self, key: str | None) -> Iterator[None]:
        previous = self.active
        self.activate(key)
        try:
            yield
        finally:
            self.activate(previous)

    # --- reading an adapter -------------------------------------------------------------------

    @staticmethod
    def _is_full(choice: AdapterChoice) -> bool:
        try:
            config = json.loads((choice.config_dir / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return False
        return str(config.get("fine_tune_type", "lora")).lower() == "full"

    def _read(self, choice: AdapterChoice) -> dict[str, tuple[mx.array, mx.array, float]]:
        def unfit(why: str) -> ForgeError:
            return ForgeError(ErrorCode.INVALID_REQUEST, f"The adapter does not fit this model: {why}",
                              details={"field": "adapter", "adapter": choice.requested},
                              suggestion="Use an adapter trained on the loaded base model "
                                         "(its training_config.json names the model).")

        try:
            config = json.loads((choice.config_dir / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"Unreadable adapter_config.json: {exc}",
                             details={"field": "adapter", "adapter": choice.requested}) from None
        kind = str(config.get("fine_tune_type", "lora")).lower()
        if kind != "lora":
            raise ForgeError(ErrorCode.INVALID_REQUEST,
                             f"Per-request adapters are LoRA adapters; this one is {kind}",
                             details={"field": "adapter", "adapter": choice.requested},
                             suggestion="Load it with the model instead: POST /api/model/load with adapter_path.")
        params = config.get("lora_parameters") or {}
        scale = params.get("scale")
        if scale is None and params.get("alpha") is not None and params.get("rank"):
            scale = params["alpha"] / params["rank"]
        if scale is None:
            raise unfit("adapter_config.json lacks lora_parameters scale (or alpha and rank)")
        weights = mx.load(str(choice.weights))
        pairs: dict[str, dict[str, mx.array]] = {}
        for name, value in weights.items():
            path, _, leaf = name.rpartition(".")
            if leaf not in ("lora_a", "lora_b"):
                raise unfit(f"unexpected tensor {name}")
            pairs.setdefault(path, {})[leaf] = value
        if not pairs:
            raise unfit("it holds no LoRA tensors")
        modules = dict(self.model.named_modules())
        deltas = {}
        for path, pair in pairs.items():
            if set(pair) != {"lora_a", "lora_b"}:
                raise unfit(f"{path} lacks lora_a or lora_b")
            layer = self._switched.get(path) or modules.get(path)
            base = layer.inner if isinstance(layer, SwitchedLinear) else layer
            if isinstance(base, _LOAD_TIME_LORA):
                base = base.linear
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise unfit(f"no linear layer {path}")
            in_dims, out_dims = _dims(base)
            a, b = pair["lora_a"], pair["lora_b"]
            shapes_fit = a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0]
            if not shapes_fit or a.shape[0] != in_dims or b.shape[1] != out_dims:
                raise unfit(f"{path}: A {tuple(a.shape)} and B {tuple(b.shape)} for a {in_dims}→{out_dims} layer")
            dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
            deltas[path] = (a.astype(dtype), b.astype(dtype), float(scale))
        for path in deltas:
            if path not in self._switched:
                self._wrap(path, modules[path])
        mx.eval([pair[:2] for pair in deltas.values()])
        return deltas

    def _wrap(self, path: str, module: nn.Module) -> None:
        parent: Any = self.model
        *parents, leaf = path.split(".")
        for part in parents:
            parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
        switched = SwitchedLinear(module, path, self)
        if isinstance(parent, list):
            parent[int(leaf)] = switched
        else:
            setattr(parent, leaf, switched)
        self._switched[path] = switched

