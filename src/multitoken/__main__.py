"""`python -m multitoken` (also what `torchrun -m multitoken` runs)."""

import sys

from multitoken.cli import main

sys.exit(main())
