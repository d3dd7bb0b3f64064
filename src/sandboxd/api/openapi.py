"""The control plane's OpenAPI 3.1 document, served at `GET /openapi.json`: made from the routes themselves (each
path, with its parameters, and each method), so it cannot miss one. A route's summary is the first line of its
handler's docstring (or its name); its request body is the schema of the pydantic model (api/models.py) the
handler reads. Errors are E2B's `{"code", "message"}`. The API key is `X-API-KEY` (for /metrics, a bearer token
too); /health, the workload identity keys and this document need none.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from sandboxd import __version__
from sandboxd.api import models

PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
ERROR = {
    "description": "An error: what was wrong and what to do",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                "required": ["code", "message"],
            }
        }
    },
}


def _body_model(handler: Any) -> type[BaseModel] | None:
    """The request body model a handler reads (a name of api/models.py's in its code), if any."""
    code = getattr(handler, "__code__", None)
    for name in code.co_names if code is not None else ():
        model = getattr(models, name, None)
        if inspect.isclass(model) and issubclass(model, BaseModel) and model.__module__ == models.__name__:
            return model
    return None


def _summary(handler: Any) -> str:
    doc = inspect.getdoc(handler)
    return doc.splitlines()[0] if doc else handler.__name__.replace("_", " ").strip()


def document(routes: Sequence[BaseRoute], public: frozenset[str], bearer: frozenset[str]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        path = PARAM.sub(r"{\1}", route.path)
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in PARAM.findall(route.path)
        ]
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op: dict[str, Any] = {
                "operationId": f"{method.lower()}_{route.name}_{len(paths)}",
                "summary": _summary(route.endpoint),
                "responses": {"2XX": {"description": "Done"}, "default": ERROR},
            }
            if params:
                op["parameters"] = params
            model = _body_model(route.endpoint)
            if model is not None:
                schemas[model.__name__] = model.model_json_schema(
                    by_alias=True, ref_template="#/components/schemas/{model}"
                )
                schemas.update(schemas[model.__name__].pop("$defs", {}))
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                op["requestBody"] = {"content": {"application/json": {"schema": ref}}}
            if path in public:
                op["security"] = []
            elif path in bearer:
                op["security"] = [{"apiKey": []}, {"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sandboxd",
            "version": __version__,
            "description": "E2B's control plane as the official SDKs use it, and sandboxd's extensions.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"apiKey": []}],
    }
