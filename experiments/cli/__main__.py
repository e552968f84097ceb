"""`python -m experiments.cli` runs the `coxmoe` command."""

import sys

from experiments.cli import main

sys.exit(main())
