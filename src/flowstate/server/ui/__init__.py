"""The web UI of ``flowstate serve``: a page of hand-written HTML, CSS and JS modules (in
``flowstate/server/static``) over a small JSON API, a live stream and two operator actions."""

from flowstate.server.ui.routes import UI, is_public

__all__ = ["UI", "is_public"]
