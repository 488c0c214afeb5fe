"""A live, read-only web dashboard of queries: ``ms.start_ui()`` and ``microstream ui``.

- :mod:`microstream.ui.server`: the HTTP server (standard library only), bound to
  loopback unless told otherwise; GET and HEAD only.
- :mod:`microstream.ui.views`: the JSON the pages poll, from a live query or a checkpoint.
- :mod:`microstream.ui.charts`: charts drawn on the server as inline SVG.
- ``static/``: the two pages, their script and style (nothing is fetched from elsewhere).
"""

from __future__ import annotations

from microstream.ui.server import Dashboard, start_ui

__all__ = ["Dashboard", "start_ui"]
