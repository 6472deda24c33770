"""convscope's engine: manifest, datasets, models, planning, Ray execution, writers, CLI."""

__version__ = "0.1.0"
