"""The inference service."""

from forgellm.services.base import Service


class InferenceService(Service):
    name = "inference"
