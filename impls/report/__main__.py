"""``python -m impls.report``: see :func:`impls.report.main`."""
import sys

from . import main

sys.exit(main())
