"""Writes the `.cog/openapi_schema.json` that `cog build` (0.23.1) writes for predict.py.

`cog build` is a Go program that is not on PyPI; it derives the schema statically from
the predictor's signature (replicate/cog pkg/schema). This follows the same rules for
the types the mirror predictor uses: each input's `x-order`, title-cased `title`,
JSON type, `default`, `nullable` for Optional, `description`, `minimum`/`maximum`; an
iterator output; the fixed request/response/status/validation-error components; and
the paths `/`, `/health-check`, `/predictions` (with `x-cog-streaming`) and its cancel.
Usage: python cog_build_schema.py OUT_PATH (run where predict.py can be imported).
"""

import inspect
import json
import sys
import typing

sys.path.insert(0, ".")
import predict  # noqa: E402

COG_VERSION = "0.23.1"


def title(name):
    return " ".join(w[:1].upper() + w[1:] for w in name.split("_"))


def inputs():
    props, required = {}, []
    params = [p for n, p in inspect.signature(predict.Predictor.predict).parameters.items() if n != "self"]
    for order, p in enumerate(params):
        fi, ann = p.default, p.annotation
        nullable = typing.get_origin(ann) is typing.Union and type(None) in typing.get_args(ann)
        base = next(a for a in typing.get_args(ann) if a is not type(None)) if nullable else ann
        jtype = {str: "string", int: "integer", float: "number", bool: "boolean"}[base]
        prop = {"x-order": order, "title": title(p.name), "type": jtype}
        if fi.default is not None or nullable:
            prop["default"] = fi.default
        else:
            required.append(p.name)
        if nullable:
            prop["nullable"] = True
        if fi.description is not None:
            prop["description"] = fi.description
        if fi.ge is not None:
            prop["minimum"] = fi.ge
        if fi.le is not None:
            prop["maximum"] = fi.le
        props[p.name] = dict(sorted(prop.items()))
    schema = {"title": "Input", "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def ok(schema):
    return {"description": "Successful Response", "content": {"application/json": {"schema": schema}}}


VALIDATION = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def document():
    s = lambda t, **kw: {"title": t, "type": "string", **kw}  # noqa: E731
    components = {
        "Input": inputs(),
        "Output": {
            "items": {"type": "string"},
            "title": "Output",
            "type": "array",
            "x-cog-array-display": "concatenate",
            "x-cog-array-type": "iterator",
        },
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": s("Id"), "input": {"$ref": "#/components/schemas/Input"}},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": s("Id"),
                "version": s("Version"),
                "created_at": s("Created At", format="date-time"),
                "started_at": s("Started At", format="date-time"),
                "completed_at": s("Completed At", format="date-time"),
                "status": s("Status"),
                "error": s("Error"),
                "logs": s("Logs"),
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": s("Message"),
                "type": s("Error Type"),
            },
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok({})}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": ok({})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
                },
                "responses": {"200": ok({"$ref": "#/components/schemas/PredictionResponse"}), "422": VALIDATION},
                "x-cog-streaming": True,
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": ok({}), "422": VALIDATION},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": COG_VERSION},
        "paths": paths,
        "components": {"schemas": components},
    }


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(document(), f, separators=(",", ":"))
