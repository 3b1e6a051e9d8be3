"""`python -m tokenhub.mock [OPTIONS]`: the mock upstream, as `tokenhub mock-upstream` runs it."""

import sys

from tokenhub.cli.mock import main

sys.exit(main())
