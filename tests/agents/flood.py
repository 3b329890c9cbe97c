"""Floods stdout: LINES_MB of 1 KiB lines, then one LONG_MB line with no newline at all.

Usage: ``flood.py [LINES_MB [LONG_MB]]`` (defaults 200 and 100).
"""

import sys

lines_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
long_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 100
out = sys.stdout.buffer
line = b"x" * 1023 + b"\n"
block = line * 1024  # 1 MiB
for _ in range(lines_mb):
    out.write(block)
out.write(b'{"result": "flood done"}\n')
chunk = b"y" * (1024 * 1024)
for _ in range(long_mb):
    out.write(chunk)
out.flush()
