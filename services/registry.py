"""Service name → class, imported lazily so one service never loads another's modules."""

from __future__ import annotations

import importlib

from forgellm.config import Settings
from forgellm.services.base import Service

_CLASSES = {
    "trainer": "forgellm.services.trainer:TrainerService",
    "inference": "forgellm.services.inference:InferenceService",
    "catalog": "forgellm.services.catalog:CatalogService",
    "publisher": "forgellm.services.publisher:PublisherService",
}


def create(name: str, settings: Settings) -> Service:
    module_name, _, class_name = _CLASSES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(settings)
