"""``python -m fairnas`` is the ``fairnas`` command (also under ``torchrun``)."""

import sys

from fairnas.cli import main

sys.exit(main())
