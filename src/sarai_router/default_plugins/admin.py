"""Default plugin ``admin``: residency control from outside, and the live page at ``/ui``.

Built on the public hooks only, as any plugin could be:

- ``observe`` feeds every event (routed, generation finished, model loaded...) to the
  hub (:mod:`~sarai_router.default_plugins.admin_events`), which keeps the last minutes
  of them and hands them to each open event stream;
- ``register_routes`` adds the admin API (``/admin/...``: models, load, unload, route,
  events) and the page (``/ui``), see :mod:`sarai_router.default_plugins.admin_http`;
- the hub is on from ``register_routes`` (a server is being built) or ``startup`` on; a
  one-shot command such as ``route`` keeps nothing. ``shutdown`` turns it off and ends
  the open event streams, so a stopping server need not wait for them.

This module stays light (no server stack): every command imports the default plugins,
and ``route`` must stay quick. The routes' module is imported only by ``serve``.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .admin_events import HUB


@hookimpl(trylast=True)
def observe(event):
    if HUB.active:
        HUB.publish(event)


@hookimpl(trylast=True)
def startup(engine):
    HUB.active = True


@hookimpl(trylast=True)
def register_routes():
    from .admin_http import routes

    # A server is being built: keep its events from now on (the pinned models' loads
    # happen before ``startup``).
    HUB.active = True
    return routes()


@hookimpl(trylast=True)
def shutdown(engine):
    HUB.active = False
    HUB.close_all()
