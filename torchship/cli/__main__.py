"""`python -m torchship.cli`."""

import sys

from torchship.cli import main

sys.exit(main())
