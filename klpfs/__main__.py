"""`python -m klpfs` is the klpfs command."""

import sys

from klpfs.cli import main

sys.exit(main())
