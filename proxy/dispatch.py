"""The routes with a fixed path, dispatched past aiohttp's router and Application.

aiohttp's `Application._handle` resolves the path, builds a match info, adds the app to it and
freezes it, then calls the middleware chain (with a middleware of its own that keeps
`current_app` right for sub-applications) for every request. For a route whose path has no
variable part the answer is the same each time, so it is made once, when the app is frozen: a
request whose method and path name such a route goes straight to the app's middlewares and the
route's handler, with that prebuilt match info. Every other request (a path with variables, a
wrong method, no such route) takes aiohttp's own way, unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web
from aiohttp.web_urldispatcher import PrefixedSubAppResource, UrlMappingMatchInfo

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def fixed_routes(
    app: web.Application,
) -> dict[tuple[str, str], tuple[UrlMappingMatchInfo, Handler]]:
    """(method, path) -> the frozen match info and the middleware chain around the handler,
    for each route of `app` whose path has no variable part (none with sub-applications,
    whose `current_app` changes per request)."""
    table: dict[tuple[str, str], tuple[UrlMappingMatchInfo, Handler]] = {}
    resources = list(app.router.resources())
    if any(isinstance(r, PrefixedSubAppResource) for r in resources):
        return table
    for resource in resources:
        if not isinstance(resource, web.PlainResource):
            continue
        for route in resource:
            if route.method == "*" or (route.method, resource.canonical) in table:
                continue  # any method: aiohttp sorts it out; a path added twice: the first
            match_info = UrlMappingMatchInfo({}, route)
            match_info.add_app(app)
            match_info.freeze()
            handler: Handler = route.handler  # type: ignore[assignment]
            for middleware in reversed(app.middlewares):
                handler = partial(middleware, handler=handler)
            table[route.method, resource.canonical] = (match_info, handler)
    return table


def dispatcher(app: web.Application, slow: Handler) -> Handler:
    """The request handler for a frozen `app`: fixed routes straight, the rest by `slow`
    (aiohttp's own `Application._handle`)."""
    table = fixed_routes(app)

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function handing back the handler's coroutine: no frame of its own to keep
        # for the life of the request.
        hit = table.get((request.method, request.rel_url.path_safe))
        if hit is None:
            return slow(request)
        match_info, handler = hit
        request._match_info = match_info  # type: ignore[attr-defined]
        return handler(request)

    return dispatch
