"""`python -m omnicache_export.cli ...`, the same as `omnicache-export ...`."""

import sys

from omnicache_export.cli.main import main

sys.exit(main())
