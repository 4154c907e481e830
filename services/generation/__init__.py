"""Text generation with MLX, shared by the inference service and ``forgellm cli generate``.

``adapters`` resolves an adapter path (no MLX); ``engine`` loads a model and generates (imports
MLX, after ``preload_blas``); ``worker`` runs all MLX work of one model on one dedicated thread.
"""
