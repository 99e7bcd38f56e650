"""The OpenAPI document, with the ``/predict`` body showing the default model's instance fields.

A model's feature spec is known only at runtime, from the workers, and FastAPI builds its document once
and synchronously. So ``/openapi.json`` (which ``/docs`` reads) is replaced by an async route that asks
a worker for the newest version's spec and patches the static document; until a worker is up, or when
there is no default model, it serves the static one. One document is kept per (model, version).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from fastapi import FastAPI, Request, Response

from app_server.catalog import ModelCatalog
from app_server.http_io import json_response
from app_server.schemas import instance_schema, predict_body_schema
from shared.errors import TandemError
from shared.features import FeatureSpec

logger = logging.getLogger(__name__)


def install_openapi(app: FastAPI) -> None:
    url = app.openapi_url or "/openapi.json"
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != url]
    documents: dict[tuple[str, str], dict[str, Any]] = {}

    @app.get(url, include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        catalog: ModelCatalog = request.app.state.catalog
        try:
            model = catalog.default()
            version, desc = await catalog.describe(model)
        except TandemError as exc:  # the static document is still useful without the model's fields
            logger.debug("OpenAPI: no default model's fields to show (%s)", exc.message)
            return json_response(app.openapi())
        if (model, version) not in documents:
            documents[model, version] = with_instance_schema(
                app.openapi(), model, version, desc, catalog.settings.max_instances
            )
        return json_response(documents[model, version])


def with_instance_schema(
    base: dict[str, Any], model: str, version: str, desc: dict[str, Any], max_instances: int
) -> dict[str, Any]:
    """A copy of ``base`` whose /predict request body documents one version's instance fields."""
    doc = copy.deepcopy(base)
    spec = FeatureSpec.model_validate(desc["feature_spec"])
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["PredictInstance"] = instance_schema(spec, f"{model} v{version} instance")
    post = doc["paths"]["/predict"]["post"]
    body = post["requestBody"]["content"]["application/json"]
    body["schema"] = predict_body_schema("#/components/schemas/PredictInstance", max_instances)
    if desc.get("input_example"):
        body["example"] = {"instances": desc["input_example"][:2]}
    post["description"] = (
        f"{post.get('description', '')}\n\nInstances are validated against the feature spec of {model} "
        f"v{version}, the newest version a worker serves."
    ).strip()
    return doc
