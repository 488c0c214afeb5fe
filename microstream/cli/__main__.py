"""``python -m microstream.cli``: the ``microstream`` command."""

import sys

from microstream.cli.main import main

sys.exit(main())
