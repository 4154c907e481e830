"""Model import: GGUF files, the offline demo model, Hugging Face downloads."""

from forgellm.services.modelio.gguf import ModelImportError, import_gguf

__all__ = ["ModelImportError", "import_gguf"]
