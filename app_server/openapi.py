"""The OpenAPI document (``/openapi.json``, which ``/docs`` reads), with each served model's own request
body on paths of its own.

A model's feature spec and tensor signature are known only at runtime, from the workers, and the routes
are templated by model name (``/v1/models/{name}/predict``). OpenAPI cannot vary a body by the value of
a path parameter, and a ``oneOf`` of every model's body on the templated route would admit a churn
body for demo. So each model a worker describes gets concrete paths, ``/v1/models/demo/predict`` and
``/v2/models/demo/infer``, with exactly its fields (or its tensor's name, datatype and width), listed
under a tag named after it; OpenAPI matches a concrete path before a templated one, so those bodies are
the ones that govern the model's requests. The templated routes stay, with a generic body, for names a
``*`` worker may load after the document was made. ``/predict`` documents the default model's body.

The document is rebuilt when the set of (model, newest version) or the default model changes; until a
worker describes a model it is the static one FastAPI builds from the routes. With API keys on
(:mod:`app_server.api_keys`) it declares both ways of sending one, and the 401 and 429 they bring.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, Response

from app_server.catalog import ModelCatalog
from app_server.error_render import speaks_v2
from app_server.http_io import json_response
from app_server.schemas import describe_instance, predict_body_schema
from app_server.v2_tensors import infer_body_schema
from shared.errors import TandemError
from shared.features import FeatureSpec

logger = logging.getLogger(__name__)

MAX_DOCUMENTS = 16
"""Documents kept (one per state of the fleet); a rollout makes a few, a flapping fleet must not grow it."""

Described = dict[str, tuple[str, dict[str, Any]]]


def install_openapi(app: FastAPI) -> None:
    url = app.openapi_url or "/openapi.json"
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != url]
    documents: dict[tuple[Any, ...], dict[str, Any]] = {}

    @app.get(url, include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        catalog: ModelCatalog = request.app.state.catalog
        described = await describe_all(catalog)
        try:
            default: str | None = catalog.default()
        except TandemError:  # several models and no default, or none yet: /predict keeps the generic body
            default = None
        key = (default, tuple(sorted((m, v) for m, (v, _) in described.items())))
        if key not in documents:
            if len(documents) >= MAX_DOCUMENTS:
                documents.clear()
            documents[key] = with_models(static_document(app), described, default, catalog.settings.max_instances,
                                         entities=catalog.settings.redis_url is not None)  # fmt: skip
            if (keys := getattr(app.state, "api_keys", None)) is not None:
                declare_security(documents[key], keys.exempt)
        return json_response(documents[key])


def static_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of the routes, less the 422 it adds to every route with parameters: that
    shape (``HTTPValidationError``) is FastAPI's own validation, which no route here uses."""
    doc = app.openapi()
    if "HTTPValidationError" in doc.get("components", {}).get("schemas", {}):
        for ops in doc["paths"].values():
            for op in ops.values():
                schema = op["responses"].get("422", {}).get("content", {}).get("application/json", {}).get("schema")
                if schema == {"$ref": "#/components/schemas/HTTPValidationError"}:
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(name, None)
    return doc


async def describe_all(catalog: ModelCatalog) -> Described:
    """(newest version, description) of every model a live worker can describe now."""
    names = catalog.names()
    found = await asyncio.gather(*(catalog.describe(m) for m in names), return_exceptions=True)
    described: Described = {}
    for name, result in zip(names, found, strict=True):
        if isinstance(result, TandemError):
            logger.debug("OpenAPI: %s not described (%s)", name, result.message)
        elif isinstance(result, BaseException):
            raise result
        else:
            described[name] = result
    return described


TEMPLATES = {
    "predict": "/v1/models/{name}/predict",
    "infer": "/v2/models/{name}/infer",
    "infer_version": "/v2/models/{name}/versions/{version}/infer",
}
"""The templated routes that take a body: each described model gets a concrete copy of each."""


def with_models(
    base: dict[str, Any], described: Described, default: str | None, max_instances: int, *, entities: bool
) -> dict[str, Any]:
    """A copy of ``base`` with each described model's paths, and ``/predict`` showing the default's body."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    paths = doc["paths"]
    templates = {kind: paths[path]["post"] for kind, path in TEMPLATES.items()}
    # The generic bodies, bounded by this app server's --max-instances (any model's fields or tensor).
    generic = {
        "predict": predict_body_schema({"type": "object"}, max_instances),
        "infer": infer_body_schema(None, None, max_instances),
        "infer_version": infer_body_schema(None, None, max_instances),
    }
    for kind, schema in generic.items():
        templates[kind]["requestBody"]["content"]["application/json"]["schema"] = schema
    paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"] = generic["predict"]
    used: set[str] = set()
    for model in sorted(described):
        version, desc = described[model]
        key = _component_name(model, used)
        schemas[key] = describe_instance(desc, entities, f"{model} v{version} instance")
        predict = {"schema": predict_body_schema({"$ref": f"#/components/schemas/{key}"}, max_instances)}
        if desc.get("input_example"):
            predict["example"] = {"instances": desc["input_example"][:2]}
        described_by = "feature spec" if desc.get("feature_spec") is not None else "MLflow signature"
        predict_note = f"Instances are validated against the {described_by} of {model} v{version}, the newest served."
        if desc.get("feature_spec") is None:
            columns = ", ".join(f"{i['name']!r} {i['datatype']}" for i in desc["inputs"])
            infer_note = f"{model} v{version}, the newest served, takes one 1-D tensor per column: {columns}."
            infer: dict[str, Any] = {
                "schema": infer_body_schema(None, [o["name"] for o in desc["outputs"]], max_instances)
            }
        else:
            infer, infer_note = _tensor_infer(model, version, desc, max_instances)
        for kind, body, note in (("predict", predict, predict_note), ("infer", infer, infer_note),
                                 ("infer_version", infer, infer_note)):  # fmt: skip
            path = TEMPLATES[kind].replace("{name}", quote(model, safe=""))
            paths[path] = {"post": _concrete(templates[kind], model, key, body, note)}
        if model == default:
            post = paths["/predict"]["post"]
            post["requestBody"]["content"] = {"application/json": copy.deepcopy(predict)}
            post["description"] += f"\n\nThe default model is {model}. {predict_note}"
    if described:
        for op in templates.values():
            _other_names(op, sorted(described))
    return doc


def _tensor_infer(model: str, version: str, desc: dict[str, Any], max_instances: int) -> tuple[dict[str, Any], str]:
    """The v2 body and note of a feature-spec version: its one float32 tensor."""
    spec = FeatureSpec.model_validate(desc["feature_spec"])
    signature = desc["inputs"][0]
    infer: dict[str, Any] = {
        "schema": infer_body_schema(signature, [o["name"] for o in desc["outputs"]], max_instances)
    }
    if desc.get("input_example"):
        x = spec.encoder.encode(desc["input_example"][:1])
        tensor = {"name": signature["name"], "datatype": signature["datatype"], "shape": list(x.shape)}
        infer["example"] = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
    infer_note = (
        f"The tensor of {model} v{version}, the newest served: {signature['name']!r}, "
        f"{signature['datatype']}, [rows, {signature['shape'][-1]}] (another version's may differ)."
    )
    return infer, infer_note


def _other_names(op: dict[str, Any], names: list[str]) -> None:
    """The templated route is for names without paths of their own: a model a ``*`` worker loads after
    this document was made. Said in the schema too (OpenAPI matches concrete paths first anyway), so a
    tool that fills ``name`` with a served model's name uses that model's path, not the generic body."""
    for p in op["parameters"]:
        if p["in"] == "path" and p["name"] == "name":
            p["schema"] = {"type": "string", "not": {"enum": names}}
            p["description"] = (
                "A model without a path of its own in this document (one served since it was made); "
                f"{', '.join(names)} have theirs, with their own bodies."
            )


def _component_name(model: str, used: set[str]) -> str:
    """A component key for a model's instance (``[A-Za-z0-9._-]`` only), distinct from the others."""
    base = "Instance." + re.sub(r"[^A-Za-z0-9._-]", "_", model)
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}.{n}"
    used.add(key)
    return key


def _concrete(template: dict[str, Any], model: str, key: str, body: dict[str, Any], note: str) -> dict[str, Any]:
    """The templated operation for one model: no ``name`` parameter, the model's own body."""
    op = copy.deepcopy(template)
    op["parameters"] = [p for p in op.get("parameters", []) if not (p["in"] == "path" and p["name"] == "name")]
    op["requestBody"]["content"] = {"application/json": body}
    op["operationId"] = f"{op['operationId']}.{key}"
    op["summary"] = f"{op['summary']} ({model})"
    op["description"] = f"{op.get('description', '')}\n\n{note}".strip()
    op["tags"] = [model]
    return op


_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def declare_security(doc: dict[str, Any], exempt: frozenset[str]) -> dict[str, Any]:
    """The OpenAPI document with both ways to send a key, required on every operation but the exempt
    ones, and the 401 and 429 each may answer (in its prefix's error shape)."""
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    )
    doc["security"] = [{"bearer": []}, {"apiKey": []}]
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if method not in _METHODS:
                continue
            if path in exempt:
                op["security"] = []
                continue
            error = {"$ref": f"#/components/schemas/{'ErrorV2' if speaks_v2({'path': path}) else 'ErrorV1'}"}
            content = {"application/json": {"schema": error}}
            op["responses"].setdefault("401", {"description": "No API key, or an unknown one.", "content": content})
            op["responses"].setdefault(
                "429",
                {
                    "description": "The key is over its requests per second. Retry after Retry-After.",
                    "content": content,
                    "headers": {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}},
                },
            )
    return doc
