"""Prints a line on each stream, then exits with code 3."""

import sys

print("working", flush=True)
print("something broke", file=sys.stderr, flush=True)
sys.exit(3)
