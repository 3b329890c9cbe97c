"""Names a package module imports on first use (PEP 562), so importing it stays cheap.

A package whose public names pull in heavy libraries (an HTTP client, a server,
a metrics registry) lists those names with their defining modules; the
module-level ``__getattr__`` made here imports a module the first time one of
its names is read and keeps the value, and ``__dir__`` still shows every name.
The package imports the same names under ``TYPE_CHECKING`` as well, so type
checkers and editors see ordinary re-exports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["lazy_attributes"]


def lazy_attributes(
    namespace: MutableMapping[str, object], names: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package that loads ``names`` on first use.

    Args:
        namespace: the package's ``globals()``; a name once loaded is stored
            there, so later reads are plain attribute reads.
        names: each lazy name, with the module that defines it (relative to the
            package, as in ``"._worker._worker"``).
    """
    package = str(namespace["__name__"])

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
