"""``python -m supervisor``: see ``supervisor._cli``."""

import sys

from ._cli._main import main

sys.exit(main())
