"""Writes bytes that are not valid UTF-8 on both streams, then a result line."""

import sys

sys.stdout.buffer.write(b"caf\xe9 \xff\xfe broken \xc3\x28 end\n")
sys.stderr.buffer.write(b"err \x80\x81\n")
sys.stdout.buffer.write(b'{"result": "bytes \xff survived"}\n')
sys.stdout.buffer.write(b"no newline at the end \xf0\x9f")
sys.stdout.flush()
