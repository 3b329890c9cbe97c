"""Reports its argv, environment and working directory as its JSON result."""

import json
import os
import sys

report = {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}
print(json.dumps({"result": report}), flush=True)
