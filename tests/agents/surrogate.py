"""Prints a result that is valid JSON but not valid Unicode: ``{"result": "\\ud800 ..."}``.

Also a plain line holding the same escape, so the tail and the log see it too.
"""

print("progress: \\ud800 (an escape, as text)", flush=True)
print('{"result": "done \\ud800 and \\udfff"}', flush=True)
