"""``python -m relay``: the same as the ``solo-relay`` command."""

import sys

from relay.cli.main import main

sys.exit(main())
