"""The package version, in a module of its own so that every layer can record it without importing qimg itself."""

__version__ = "0.1.0"
