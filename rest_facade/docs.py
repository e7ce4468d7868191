"""The API's own documentation: GET /openapi.yaml (the OpenAPI 3.0 spec) and Swagger UI under /swagger/.

The spec is package data (`rest_facade/openapi.yaml`, a link to the repository's `openapi.yaml`, copied into
the wheel). Swagger UI's assets come from the installed `swagger-ui-bundle` package, so the UI works offline.
The spec and the page are read when the routes are added. Swagger UI's assets (about 1.4 MB, and the
package's import of importlib_resources) are read on the first request for one, then kept: a worker whose
docs nobody opens never holds them. A request after that only picks bytes from a dict.

Asset and spec URLs in the page are relative (`./swagger-ui.css`, `../openapi.yaml`), so the UI also works
behind a proxy that mounts the gateway under a path prefix; `/swagger` redirects to `/swagger/` for that.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sanic import HTTPResponse, Request, Sanic

from gateway.errors import NotFoundError

from .headers import REQUEST_ID, request_id

SPEC_PATH = "/openapi.yaml"
SWAGGER_PATH = "/swagger/"
SPEC_CONTENT_TYPE = "application/yaml"
TITLE = "llm-gateway REST API"

# The bundle's files the page loads (its source maps and its Petstore-pointing initializer are left out).
_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "index.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_NO_CACHE = {"cache-control": "no-cache"}
_CACHE_ASSET = {"cache-control": "public, max-age=86400"}

_INDEX = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="./index.css">
    <link rel="icon" type="image/png" href="./favicon-32x32.png" sizes="32x32">
    <link rel="icon" type="image/png" href="./favicon-16x16.png" sizes="16x16">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""

# BaseLayout: no top bar with a URL box, so the page only ever shows this gateway's own spec.
_INITIALIZER = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: new URL("../openapi.yaml", window.location.href).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    displayRequestDuration: true,
  });
};
"""


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    headers: dict[str, str]


def spec_bytes() -> bytes:
    """The served OpenAPI document, from the package."""
    return (resources.files(__package__) / "openapi.yaml").read_bytes()


def _load() -> dict[str, _File]:
    """The files the docs serve from the start (not Swagger UI's assets), by the path each is served at."""
    return {
        SPEC_PATH: _File(spec_bytes(), SPEC_CONTENT_TYPE, _NO_CACHE),
        SWAGGER_PATH: _File(_INDEX.format(title=html.escape(TITLE)).encode(), "text/html; charset=utf-8", _NO_CACHE),
        SWAGGER_PATH + "swagger-initializer.js": _File(
            _INITIALIZER.encode(), "text/javascript; charset=utf-8", _NO_CACHE
        ),
    }


def _load_asset(name: str) -> _File:
    """One of Swagger UI's assets (a name of _ASSETS), from the installed bundle."""
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return _File((Path(str(swagger_ui_path)) / name).read_bytes(), _ASSETS[name], _CACHE_ASSET)


def add_docs_routes(app: Sanic[Any, Any]) -> None:
    """GET /openapi.yaml, GET /swagger/ (and its assets), and /swagger -> /swagger/."""
    files = _load()

    def respond(request: Request, path: str) -> HTTPResponse:
        found = files.get(path)
        if found is None:
            name = path.removeprefix(SWAGGER_PATH)
            if name == path or name not in _ASSETS:
                raise NotFoundError(f"Invalid URL ({request.method} {request.path}).")
            found = files[path] = _load_asset(name)  # the first request for it: read once, then kept
        headers = {**found.headers, REQUEST_ID: request_id(request.headers)}
        return HTTPResponse(found.body, headers=headers, content_type=found.content_type)

    async def spec(request: Request) -> HTTPResponse:
        return respond(request, SPEC_PATH)

    async def index(request: Request) -> HTTPResponse:
        return respond(request, SWAGGER_PATH)

    async def asset(request: Request, name: str) -> HTTPResponse:
        return respond(request, SWAGGER_PATH + name)

    async def to_index(request: Request) -> HTTPResponse:
        # Relative, so that it stays right under a proxy's path prefix: /prefix/swagger -> /prefix/swagger/.
        location = SWAGGER_PATH.strip("/") + "/"
        return HTTPResponse(status=301, headers={"location": location, REQUEST_ID: request_id(request.headers)})

    app.add_route(spec, SPEC_PATH, methods=["GET"], name="docs_spec")
    app.add_route(index, SWAGGER_PATH, methods=["GET"], name="docs_swagger", strict_slashes=True)
    app.add_route(
        to_index, SWAGGER_PATH.rstrip("/"), methods=["GET"], name="docs_swagger_redirect", strict_slashes=True
    )
    app.add_route(asset, SWAGGER_PATH + "<name:str>", methods=["GET"], name="docs_swagger_asset")
