"""`python -m engine.cli ...`: the `mae` command."""

import sys

from . import main

sys.exit(main())
