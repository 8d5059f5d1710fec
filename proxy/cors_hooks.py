"""`server.cors` on the app: preflights answered, Access-Control-* on every answer.

Installed only when `server.cors` is set, so a gateway without it runs no code of this
module. The admin API is left out: no browser origin is ever allowed to call it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.auth import is_admin_path
from proxy.cors import CorsConfig, CorsPolicy, answer_headers, is_preflight, preflight_headers
from proxy.errors import NotFound
from proxy.middleware import EXCHANGE

# The Allow-* headers of a preflight's answer, set with every other CORS header at prepare.
_PREFLIGHT: web.RequestKey[dict[str, str]] = web.RequestKey("cors_preflight", dict)
_PREFIX = "access-control-"


def install_cors(app: web.Application, cors: CorsConfig) -> None:
    """Answer CORS preflights on the gateway's routes, and put `cors`'s headers on every
    answer (the gateway's own and a backend's, a stream's head too)."""
    policy = CorsPolicy.of(cors)

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A preflight is answered here, after the request id and before any handler, so it
        never reaches a backend (it comes without a key: proxy/middleware.py lets it in)."""
        headers = request.headers
        if request.method != "OPTIONS" or not is_preflight(headers) or is_admin_path(request.path):
            return await handler(request)
        route, methods = await _route_of(request)
        if route is None:
            raise NotFound("no such route")
        request[EXCHANGE].route = route
        request[_PREFLIGHT] = preflight_headers(
            policy,
            headers["Origin"],
            headers["Access-Control-Request-Method"],
            headers.get("Access-Control-Request-Headers", ""),
            methods,
        )
        return web.Response(status=204)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare`: a backend's own Access-Control-* headers out (vLLM adds
        `Access-Control-Allow-Origin: *` by default), the gateway's in, before the head goes."""
        if is_admin_path(request.path):
            return
        out = response.headers
        for name in [n for n in out if n[: len(_PREFIX)].lower() == _PREFIX]:
            del out[name]
        headers, vary = answer_headers(policy, request.headers.get("Origin"))
        out.update(headers)
        if headers:
            out.update(request.get(_PREFLIGHT, {}))
        if vary:
            out.add("Vary", "Origin")

    app.middlewares.append(preflight)
    app.on_response_prepare.append(add_headers)


async def _route_of(request: web.Request) -> tuple[str | None, frozenset[str]]:
    """The route template a preflight's path belongs to and the methods served there (`*`:
    any), as the router would find them; (None, empty) for a path no route serves."""
    route: str | None = None
    methods: set[str] = set()
    for resource in request.app.router.resources():
        match, allowed = await resource.resolve(request)
        if match is not None or allowed:
            route = route or resource.canonical
            methods |= allowed
    return route, frozenset(methods)
