"""JSON-schema facts that need no grammar engine: shared by the server (checking a request's tool
schemas before queueing it) and the runtime (before compiling a constraint)."""

from __future__ import annotations

MAX_STEPS = 200_000  # schema nodes visited at most: far above any real schema, far below a second


class SchemaTooComplex(ValueError):
    """The schema needs more analysis than a request may cost."""


def has_finite_instance(schema: dict, max_steps: int = MAX_STEPS) -> bool:
    """False when every instance would be infinite: a required property (or non-empty array) whose
    schema leads back to itself through `$ref`s with no way out, e.g. {"properties": {"a": {"$ref": "#"}},
    "required": ["a"]}. Constrained decoding would open brackets until the budget ran out.

    Each `$ref` is judged with the others as judged so far (infinite until shown finite), and judged
    again only when a reference it read turns finite: following references down every path instead
    costs 2^n on a chain of `allOf` pairs. Raises SchemaTooComplex past `max_steps` nodes visited."""
    steps = 0
    finite_refs: dict[str, bool] = {}  # every reference met, and whether a finite instance is known
    readers: dict[str, set[str]] = {}  # reference → the references whose judgement read it
    todo: list[str] = []
    judging: str | None = None

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

    def finite(node: object, depth: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > max_steps:
            raise SchemaTooComplex(f"the schema needs more than {max_steps} steps to check; simplify it")
        if not isinstance(node, dict) or depth > 64:
            return node is not False
        if isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref not in finite_refs:
                finite_refs[ref] = False
                todo.append(ref)
            if judging is not None:
                readers.setdefault(ref, set()).add(judging)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return finite_refs[ref] and finite(rest, depth + 1)
        if "anyOf" in node or "oneOf" in node:
            options = node.get("anyOf") or node.get("oneOf") or []
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
            if not any(finite(o, depth + 1) for o in options if isinstance(options, list)):
                return False
            return finite(rest, depth + 1)
        if isinstance(node.get("allOf"), list) and not all(finite(o, depth + 1) for o in node["allOf"]):
            return False
        types = node.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types is not None and any(t not in ("object", "array") for t in types):
            return True
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        if not all(finite(props.get(r, True), depth + 1) for r in required if isinstance(r, str)):
            return False
        min_items = node.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0 and "items" in node:
            return finite(node["items"], depth + 1)
        return True

    finite(schema, 0)  # meets the references the root leads to
    while todo:  # a reference only ever turns finite, and then its readers are judged again
        judging = todo.pop()
        if not finite_refs[judging] and finite(resolve(judging), 0):
            finite_refs[judging] = True
            todo.extend(readers.get(judging, ()))
    judging = None
    return finite(schema, 0)
