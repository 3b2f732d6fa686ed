"""``auditctl serve``: the web dashboard, a face of the library like the command line.

It reads and acts only through the library (``overview``, ``rules``, ``audits``,
``recovery``, ``registry``) and renders the library's records, so the pages, the JSON
API and ``auditctl ... --format json`` cannot disagree. It never imports ``auditctl.cli``.

* ``app.py``: the application factory, the dashboard's state, the HTML routes and actions
* ``api.py``: the JSON endpoints under ``/api/`` (documented there)
* ``security.py``: sign-in sessions, CSRF tokens, Origin and Host checks, security headers
* ``params.py``: query strings and JSON bodies into the library's filter objects
* ``views.py``: the HTML, every stored string escaped
* ``static/``: CSS, a few lines of JavaScript and the vendored htmx; ``templates/``: the layout

Starlette and uvicorn are imported only here, so the other commands start without them.
"""

from .app import create_app

__all__ = ["create_app"]
