"""The fixed routes' dispatch past aiohttp's router: the same routes, the same middlewares."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.dispatch import dispatcher, fixed_routes

N = web.AppKey("n", int)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text=f"{request.match_info.route.resource.canonical} {request.app[N]}")


def _app(seen: list[str]) -> web.Application:
    @web.middleware
    async def outer(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        seen.append("outer")
        return await handler(request)

    @web.middleware
    async def inner(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        seen.append("inner")
        return await handler(request)

    app = web.Application(middlewares=[outer, inner])
    app[N] = 7
    app.router.add_post("/v1/chat/completions", _ok)
    app.router.add_get("/health", _ok)
    app.router.add_get("/v1/models/{model:.+}", _ok)
    app.router.add_route("*", "/any", _ok)
    app.freeze()
    return app


def test_only_fixed_paths_with_one_method_are_in_the_table() -> None:
    table = fixed_routes(_app([]))
    assert set(table) == {
        ("POST", "/v1/chat/completions"),
        ("GET", "/health"),
        ("HEAD", "/health"),
    }


def test_an_app_with_sub_applications_keeps_aiohttps_own_way() -> None:
    app = web.Application()
    app.router.add_get("/health", _ok)
    app.add_subapp("/sub", web.Application())
    app.freeze()
    assert fixed_routes(app) == {}


async def test_a_fixed_route_runs_every_middleware_in_order_with_its_match_info() -> None:
    seen: list[str] = []
    app = _app(seen)

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("a fixed route went the slow way")

    dispatch = dispatcher(app, slow)
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    response = await dispatch(request)
    assert isinstance(response, web.Response)
    assert response.text == "/v1/chat/completions 7"
    assert seen == ["outer", "inner"]


async def test_every_other_request_goes_to_aiohttps_handler() -> None:
    app = _app([])
    went: list[str] = []

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        went.append(f"{request.method} {request.path}")
        return web.Response(status=204)

    dispatch = dispatcher(app, slow)
    for method, path in [
        ("GET", "/v1/chat/completions"),  # a fixed path with the wrong method: aiohttp's 405
        ("POST", "/v1/chat/completions/"),
        ("GET", "/v1/models/m"),
        ("PUT", "/any"),
        ("GET", "/nowhere"),
    ]:
        assert (await dispatch(make_mocked_request(method, path, app=app))).status == 204
    assert went == [
        "GET /v1/chat/completions",
        "POST /v1/chat/completions/",
        "GET /v1/models/m",
        "PUT /any",
        "GET /nowhere",
    ]
