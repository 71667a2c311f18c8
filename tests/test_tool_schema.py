"""The schema a forced tool call is constrained to: each tool's parameters sit inside a wrapper, and
their own `$ref`s (pydantic's `#/$defs/...` for a nested model) still point at their definitions."""

from __future__ import annotations

import jsonschema
import pytest

from edgevl.server.tools import call_schema

ADDRESS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
PARCEL = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
          "properties": {"to": {"$ref": "#/$defs/Address"}, "note": {"const": {"$ref": "#/not/a/pointer"}},
                         "default": {"$ref": "#/$defs/Address"}},  # a property's name, not the keyword
          "required": ["to"], "$defs": {"Address": ADDRESS}}
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}  # recursive, finite
# another tool whose definition has the same name and another shape
ROUTE = {"type": "object", "properties": {"via": {"$ref": "#/$defs/Address"}}, "required": ["via"],
         "$defs": {"Address": {"type": "object", "properties": {"zip": {"type": "integer"}}, "required": ["zip"]}}}


def tools(**params: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in params.items()]


@pytest.mark.parametrize("only", [None, "ship"])
def test_refs_resolve_inside_the_wrapper(only):
    schema = call_schema(tools(ship=PARCEL, route=ROUTE, tree=TREE), only)
    ship = {"name": "ship", "arguments": {"to": {"city": "Oslo"}, "note": {"$ref": "#/not/a/pointer"}}}
    jsonschema.validate(ship, schema)
    with pytest.raises(jsonschema.ValidationError):  # the ref reached Address: its own keys are checked
        jsonschema.validate({"name": "ship", "arguments": {"to": {"zip": 1}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "ship", "arguments": {"to": {"city": "Oslo"}, "default": {"zip": 1}}}, schema)
    if only is None:
        jsonschema.validate({"name": "route", "arguments": {"via": {"zip": 7}}}, schema)
        with pytest.raises(jsonschema.ValidationError):  # route's Address, not ship's
            jsonschema.validate({"name": "route", "arguments": {"via": {"city": "Oslo"}}}, schema)
        jsonschema.validate({"name": "tree", "arguments": {"kids": [{"kids": [{}]}]}}, schema)
        with pytest.raises(jsonschema.ValidationError):  # "#" is the tree's own root, not the wrapper
            jsonschema.validate({"name": "tree", "arguments": {"kids": [{"kids": 3}]}}, schema)
