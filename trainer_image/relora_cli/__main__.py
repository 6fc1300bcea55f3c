"""`python -m relora_cli` = the `relora` command."""

import sys

from relora_cli import main

sys.exit(main())
