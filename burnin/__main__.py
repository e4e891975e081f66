"""`python -m burnin` is the `burnin` command."""

import sys

from burnin.cli import main

sys.exit(main())
