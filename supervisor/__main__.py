"""``python -m supervisor``: see ``supervisor._cli``."""

import sys

from ._cli import main

sys.exit(main())
