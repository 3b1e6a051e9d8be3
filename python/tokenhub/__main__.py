"""`python -m tokenhub ...`: the `tokenhub` command."""

import sys

from tokenhub.cli import main

sys.exit(main())
