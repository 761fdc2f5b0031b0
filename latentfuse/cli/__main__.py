"""`python -m latentfuse.cli ...` is `latentfuse ...` (what `accelerate launch -m` runs)."""

import sys

from latentfuse.cli.main import main

sys.exit(main())
