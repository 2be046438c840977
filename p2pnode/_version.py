"""The package version, in a module of its own so node.py and cli.py need not
import the package ``__init__`` (which imports node.py lazily)."""

__version__ = "0.1.0"
