"""The site's errors: what the command line reports as one line and exit status 1."""
from __future__ import annotations


class SiteError(Exception):
    """A problem that the command line reports as one line and exit status 1."""


class NoRunsError(SiteError):
    """No run records to build the front page from: the site keeps asv's pages only."""


class FetchError(SiteError):
    """A package could not be obtained from the registry (offline, npm missing...)."""

