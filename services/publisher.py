"""The publisher service."""

from forgellm.services.base import Service


class PublisherService(Service):
    name = "publisher"
