"""Extract from Cliniko's official OpenAPI description what the sandbox's schema tests need.

The official file (about 500 KB) is not part of this repository. This keeps the operations the
sandbox implements, with every component they refer to, in ``tests/data/cliniko-openapi-subset.json``.
Re-run after Cliniko publishes a new description::

    make openapi-subset OPENAPI=/path/to/cliniko-openapi.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OPERATIONS = (
    "/user",
    "/patients",
    "/patients/{id}",
    "/patients/{id}/archive",
    "/patients/{id}/unarchive",
    "/patient_attachments",
    "/patient_attachments/{id}",
    "/patient_attachments/{id}/archive",
    "/patients/{patient_id}/attachment_presigned_post",
    "/patients/{patient_id}/patient_attachments",
)
SUBSET = Path(__file__).with_name("cliniko-openapi-subset.json")


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node))
    return set()


def extract(document: dict[str, Any]) -> dict[str, Any]:
    """Return the document cut down to :data:`OPERATIONS` and the components they reach.

    :param document: the whole official OpenAPI description.
    """
    subset: dict[str, Any] = {key: document[key] for key in ("openapi", "info", "servers") if key in document}
    subset["paths"] = {path: document["paths"][path] for path in OPERATIONS}
    components: dict[str, dict[str, Any]] = {}
    pending = _refs(subset["paths"])
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, section, name = ref.removeprefix("#/").split("/", 2)
        node = document["components"][section][name]
        components.setdefault(section, {})[name] = node
        pending |= _refs(node)
    subset["components"] = {section: dict(sorted(items.items())) for section, items in components.items()}
    return subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("openapi", type=Path, help="the official cliniko-openapi.yaml")
    args = parser.parse_args()
    document = yaml.load(args.openapi.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    SUBSET.write_text(json.dumps(extract(document), indent=1, sort_keys=False) + "\n")
    print(f"wrote {SUBSET} ({SUBSET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
