"""JSON-schema facts that need no grammar engine: shared by the server (checking a request's tool
schemas before queueing it) and the runtime (before compiling a constraint)."""

from __future__ import annotations


def has_finite_instance(schema: dict) -> bool:
    """False when every instance would be infinite: a required property (or non-empty array) whose
    schema leads back to itself through `$ref`s with no way out, e.g. {"properties": {"a": {"$ref": "#"}},
    "required": ["a"]}. Constrained decoding would open brackets until the budget ran out."""

    def resolve(ref: str) -> object:
        node: object = schema
        if not ref.startswith("#"):
            return True  # remote references are the grammar compiler's to refuse
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return True
        return node

    def finite(node: object, refs: frozenset[str], depth: int) -> bool:
        if not isinstance(node, dict) or depth > 64:
            return node is not False
        if isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in refs:
                return False
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return finite(resolve(ref), refs | {ref}, depth + 1) and finite(rest, refs, depth + 1)
        if "anyOf" in node or "oneOf" in node:
            options = node.get("anyOf") or node.get("oneOf") or []
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
            if not any(finite(o, refs, depth + 1) for o in options if isinstance(options, list)):
                return False
            return finite(rest, refs, depth + 1)
        if isinstance(node.get("allOf"), list) and not all(finite(o, refs, depth + 1) for o in node["allOf"]):
            return False
        types = node.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types is not None and any(t not in ("object", "array") for t in types):
            return True
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        if not all(finite(props.get(r, True), refs, depth + 1) for r in required if isinstance(r, str)):
            return False
        min_items = node.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0 and "items" in node:
            return finite(node["items"], refs, depth + 1)
        return True

    return finite(schema, frozenset(), 0)
