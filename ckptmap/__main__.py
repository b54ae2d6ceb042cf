"""``python -m ckptmap`` is the ``ckptmap`` command."""

import sys

from ckptmap.cli import main

sys.exit(main())
