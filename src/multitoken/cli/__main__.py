"""`python -m multitoken.cli`, the same as `multitoken`."""

import sys

from multitoken.cli import main

sys.exit(main())
