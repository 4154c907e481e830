"""The catalog service."""

from forgellm.services.base import Service


class CatalogService(Service):
    name = "catalog"
