"""What every command of ``python -m supervisor`` shares: its name and its exit codes.

A module of its own so that each command's module can use them without
importing the argument parser (which imports every command lazily).
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_GAVE_UP", "EXIT_OK", "EXIT_USAGE", "PROG"]

#: The program name in usage lines and error messages.
PROG: Final = "python -m supervisor"

EXIT_OK: Final = 0
EXIT_GAVE_UP: Final = 1
EXIT_USAGE: Final = 2
