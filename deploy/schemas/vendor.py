"""Re-create the JSON schemas that test_deploy.py validates the rendered manifests against.

Only the kinds the manifests use are kept, each as one self-contained file (no network at test
time). Run from the repository root when a kind is added or a version is bumped:

    uv run --no-project --with kubernetes-validate==1.37.0 \
        --with cloudcoil-models-keda==2.16.1.0 python deploy/schemas/vendor.py

- Kubernetes: kubernetes-validate's "local-strict" schemas (generated from the Kubernetes OpenAPI
  document; unknown fields are errors, as with `kubectl apply --validate=strict`), with the
  definitions each kind reaches inlined under `$defs` (descriptions dropped: they are prose).
- KEDA: the pydantic models that cloudcoil-models-keda generates from KEDA's CRDs, exported as
  JSON Schema; objects are made strict the same way (an unknown field is an error).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

KUBERNETES_VERSION = "v1.33.0"  # the oldest minor still in GKE's regular channel when written
KUBERNETES_KINDS = [
    "configmap-v1",
    "deployment-apps-v1",
    "horizontalpodautoscaler-autoscaling-v2",
    "job-batch-v1",
    "namespace-v1",
    "networkpolicy-networking-v1",
    "poddisruptionbudget-policy-v1",
    "secret-v1",
    "service-v1",
    "serviceaccount-v1",
    "statefulset-apps-v1",
]
OUT = Path(__file__).parent
# A kind refers to "/api/_definitions.json#/$defs/X"; a definition to its neighbours as "#/$defs/X".
_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def _prose(key: str, value: Any) -> bool:
    """A title or description annotation (a string), not a property of that name (a schema)."""
    return key in ("title", "description") and isinstance(value, str)


def _kubernetes(name: str, definitions: dict[str, Any], root: Path) -> dict[str, Any]:
    schema = json.loads((root / f"{name}.json").read_text())
    reached: dict[str, Any] = {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and (match := _REF.match(ref)):
                key = match.group(1)
                if key not in reached:
                    reached[key] = None  # placeholder first: definitions refer to themselves
                    reached[key] = rewrite(definitions[key])
                node = {**node, "$ref": f"#/$defs/{key}"}
            return {k: rewrite(v) for k, v in node.items() if not _prose(k, v)}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    schema = rewrite(schema)
    schema.pop("$id", None)
    schema["$defs"] = dict(sorted(reached.items()))
    return schema


def _strict(node: Any) -> Any:
    """Every object with named properties refuses unknown ones (titles and prose dropped)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items() if not _prose(k, v)}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _keda() -> dict[str, dict[str, Any]]:
    from cloudcoil.models.keda import v1alpha1

    out = {}
    for kind in ("ScaledObject", "TriggerAuthentication"):
        schema = getattr(v1alpha1, kind).model_json_schema(by_alias=True, mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{kind.lower()}-keda-v1alpha1"] = _strict(schema)
    return out


def main() -> None:
    root = Path(str(resources.files("kubernetes_validate"))) / "kubernetes-json-schema"
    root = root / f"{KUBERNETES_VERSION}-local-strict"
    definitions = json.loads((root / "_definitions.json").read_text())["$defs"]
    schemas = {f"kubernetes/{n}": _kubernetes(n, definitions, root) for n in KUBERNETES_KINDS}
    schemas |= {f"keda/{n}": s for n, s in _keda().items()}
    for name, schema in schemas.items():
        path = OUT / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
