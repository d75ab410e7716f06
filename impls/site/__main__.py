"""``python -m impls.site``: see :func:`impls.site.main`."""
import sys

from . import main

sys.exit(main())
