"""The command line: argument parsing, the worker's run loop, demo, status view, serve, delegate.

The top layer: it may use every other layer, and nothing imports it.
"""

from ._main import main as main

__all__ = ["main"]
