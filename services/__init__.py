"""The bus processes that do the work. MLX is imported only under this package."""
