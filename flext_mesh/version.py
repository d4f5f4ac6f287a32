"""The version of flext-mesh, in one place."""

__version__ = "0.2.0"
