"""``python -m pbp_fast``: the ``pbp-fast`` command line."""
import sys

from pbp_fast.cli import main

sys.exit(main())
