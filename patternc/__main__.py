"""``python -m patternc`` runs the command line."""

import sys

from patternc.cli import main

sys.exit(main())
