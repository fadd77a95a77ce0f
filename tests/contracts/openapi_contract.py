"""Check requests and responses against the marketplaces' published OpenAPI documents.

Why: the fake RunPod and Vast.ai servers of the contract tests used to accept any key and
answer any shape, so a renamed or retired field never failed a test. Here every request
gpubake sends and every answer a fake gives is validated with openapi-core against the
vendor's own document, vendored byte for byte under `tests/contracts/openapi/` (source,
commit and checksum in `openapi/SOURCE.md`).

What is checked
- request: the operation exists (method and path), path and query parameters (a query
  parameter the document does not name is refused too), the bearer key, the JSON body.
- response: the status is documented, the body matches its schema. Extra response fields
  are allowed (vendors add them; gpubake must ignore what it does not read).

Unknown body fields are refused, as the real APIs do or as gpubake must act:
- RunPod REST v2 closes every request body itself (`unevaluatedProperties: false`; its
  `ErrorResponse` example is "$: additional properties 'bogus' not allowed", and
  createPod documents a 422 "The body does not match the contract"). Nothing is added.
- Vast.ai leaves its bodies open and its API ignores keys it does not know (the vendor's
  own CLI sends `client_id` and `extra`, which the document does not name). A key with no
  documented effect is a bug in gpubake, so the top level of every Vast.ai request body is
  closed here (`additionalProperties: false`); `closed` lists the operations.
- RunPod REST v1 (retired 2026-11-15) is kept for comparison only, as published.

Vast.ai's create-instance limits (`x-input-validation`: env values <= 256 characters, disk
>= 8 GB...) live outside its JSON schema and are checked from the vendored source file.

`VAST_CORRECTIONS` are the few places where a document contradicts the vendor's own CLI or
its other pages; each names its evidence. Everything else is the document as published.

Use: `contract("runpod-v2").check_request("POST", "/v2/pods", body=..., headers=...)` and
`check_response(method, path, status, body)`; `request_errors` / `response_errors` return
the list instead of raising. Paths are relative to the document's server URL.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

HERE = Path(__file__).parent / "openapi"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


class ContractError(AssertionError):
    """A request or response that the vendor's document does not allow (one line)."""


@dataclass(frozen=True)
class Correction:
    """One place where a vendor document contradicts the vendor's own code or pages."""

    where: str  # "METHOD /path" or "schema Name"
    why: str  # the evidence, as file:line in the vendor's public material
    apply: Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class VendorDoc:
    """A vendored document and how it is read."""

    name: str
    filename: str
    server: str  # the URL the document's paths hang off; a path given to a check is relative to it
    close_bodies: bool = False  # set additionalProperties: false on open request bodies
    strip_trailing_slash: bool = False
    check_spec: bool = True  # openapi-spec-validator on load
    corrections: tuple[Correction, ...] = ()
    extra_checks: Mapping[str, Callable[[Any], list[str]]] = field(default_factory=dict)  # operationId -> body check


# ------------------------------------------------------------------ Vast.ai corrections


def _body(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]


def _vast_offer_type(doc: dict[str, Any]) -> None:
    _body(doc, "POST", "/api/v0/bundles")["properties"]["type"]["enum"].append("on-demand")


def _vast_order_pairs(doc: dict[str, Any]) -> None:
    order = _body(doc, "POST", "/api/v0/bundles")["properties"]["order"]
    order["items"].update(minItems=order.pop("minItems"), maxItems=order.pop("maxItems"))


def _vast_image_or_template(doc: dict[str, Any]) -> None:
    schema = _body(doc, "PUT", "/api/v0/asks/{id}")
    schema.pop("required", None)
    schema["anyOf"] = [{"required": ["image"]}, {"required": ["template_hash_id"]}]


def _vast_edit_template_fields(doc: dict[str, Any]) -> None:
    schema = _body(doc, "PUT", "/api/v0/template")
    create = _body(doc, "POST", "/api/v0/template")
    schema["properties"] = {**copy.deepcopy(create["properties"]), **schema["properties"]}
    schema.pop("additionalProperties", None)


def _vast_instance_ports(doc: dict[str, Any]) -> None:
    binding = {"type": "object", "properties": {"HostIp": {"type": "string"}, "HostPort": {"type": ["string", "integer"]}}}
    doc["components"]["schemas"]["Instance"]["properties"]["ports"] = {
        "type": "object",
        "description": "Docker port bindings: {'8000/tcp': [{'HostIp': ..., 'HostPort': ...}]}",
        "additionalProperties": {"type": ["array", "null"], "items": binding},
    }


VAST_CORRECTIONS = (
    Correction(
        "POST /api/v0/bundles",
        "`type` enum lacks 'on-demand', which the same operation's example sends "
        "(vast-ai/docs api-reference/openapi/yaml/search_offers.yaml:269) and vast-cli sends by default "
        "(vastai/api/offers.py:5, vastai/cli/commands/offers.py:22)",
        _vast_offer_type,
    ),
    Correction(
        "POST /api/v0/bundles",
        "`order` has minItems/maxItems 2 on the list instead of on each [field, direction] pair: 'Each entry "
        "should contain two elements' (search_offers.yaml:251-260); vast-cli sends one pair, "
        "[['score', 'desc']] (vastai/api/offers.py:34)",
        _vast_order_pairs,
    ),
    Correction(
        "PUT /api/v0/asks/{id}",
        "`image` is required, yet 'When using a template, the `image` field is optional as the template "
        "provides it' (vast-ai/docs api-reference/openapi/yaml/create_instance.yaml:55)",
        _vast_image_or_template,
    ),
    Correction(
        "PUT /api/v0/template",
        "edit lists 4 fields and `additionalProperties: true` (edit_template.yaml:48) but takes the create "
        "fields ('You only need to include the fields you want to change', edit_template.yaml:13; vast-cli "
        "update_template sends the create fields, vastai/api/offers.py:313-336)",
        _vast_edit_template_fields,
    ),
    Correction(
        "schema Instance",
        "`ports` is documented as a list of integers (show_instance.yaml) but is Docker's binding map: "
        "vast-cli reads ports['22/tcp'][0]['HostPort'] (vastai/sdk.py:157, vastai/cli/commands/misc.py:209-215)",
        _vast_instance_ports,
    ),
)


@lru_cache(maxsize=1)
def vast_input_limits() -> dict[str, Any]:
    """`x-input-validation` of Vast.ai's create-instance source file (the combined document drops it)."""
    data = yaml.safe_load((HERE / "vastai-create_instance.yaml").read_text(encoding="utf-8"))
    return dict(data["x-input-validation"])


def env_entries(env: Any) -> dict[str, str]:
    """`-e KEY=VALUE` pairs of a Vast.ai env string (Docker flag format), or the object form."""
    if isinstance(env, Mapping):
        return {str(k): str(v) for k, v in env.items()}
    if not isinstance(env, str):
        return {}
    words, out = shlex.split(env), {}
    for flag, value in zip(words, words[1:]):
        if flag == "-e" and "=" in value:
            key, _, val = value.partition("=")
            out[key] = val
    return out


def vast_create_limit_errors(body: Any) -> list[str]:
    """The create-instance limits Vast.ai documents outside the JSON schema."""
    if not isinstance(body, Mapping):
        return []
    lim, errors = vast_input_limits(), []
    for name in ("image", "label"):
        value = body.get(name)
        if isinstance(value, str) and len(value) > lim[name]["max_length"]:
            errors.append(f"{name}: {len(value)} characters > {lim[name]['max_length']}")
    args = " ".join(body.get("args") or []) + str(body.get("args_str") or "") + str(body.get("onstart") or "")
    if len(args) > lim["args"]["max_length"]:
        errors.append(f"args + args_str + onstart: {len(args)} characters > {lim['args']['max_length']}")
    entries = env_entries(body.get("env"))
    for key, value in entries.items():
        if len(value) > lim["env"]["max_length"]:
            errors.append(f"env {key}: value of {len(value)} characters > {lim['env']['max_length']}")
    total = sum(len(k) + 1 + len(v) for k, v in entries.items())
    if total > lim["env"]["max_total_length"]:
        errors.append(f"env: {total} characters in all > {lim['env']['max_total_length']}")
    disk = body.get("disk")
    if isinstance(disk, (int, float)) and not isinstance(disk, bool) and disk < lim["disk"]["min"]:
        errors.append(f"disk: {disk} GB < {lim['disk']['min']}")
    price = body.get("price")
    if isinstance(price, (int, float)) and not lim["price"]["min"] <= price <= lim["price"]["max"]:
        errors.append(f"price: {price} outside {lim['price']['min']}..{lim['price']['max']}")
    return errors


DOCS: dict[str, VendorDoc] = {
    "runpod-v2": VendorDoc("runpod-v2", "runpod-v2.json", "https://api.runpod.io"),
    "runpod-v1": VendorDoc(
        # openapi-spec-validator refuses it: operationId 'UpdatePod' (and others) appear twice.
        "runpod-v1", "runpod-v1.json", "https://rest.runpod.io/v1", check_spec=False,
    ),
    "vastai": VendorDoc(
        "vastai", "vastai.yaml", "https://console.vast.ai", close_bodies=True,
        # build.py strips the trailing slash of every path; the API and the CLI use it.
        strip_trailing_slash=True, corrections=VAST_CORRECTIONS,
        extra_checks={"createInstance": vast_create_limit_errors},
    ),
}


# ------------------------------------------------------------------ the contract


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^{}]+\})", template)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _schema_errors(exc: BaseException) -> list[str]:
    """Each jsonschema error under an openapi-core exception, as 'where: message'."""
    found: list[str] = []
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        for err in getattr(node, "schema_errors", None) or ():
            where = "/".join(str(p) for p in err.absolute_path) or "$"
            found.append(f"{where}: {err.message}")
        node = node.__cause__ or node.__context__
    return found or [" ".join(str(exc).split())[:300]]


class Contract:
    """One vendored document, ready to validate requests and responses."""

    def __init__(self, vendor: VendorDoc) -> None:
        self.vendor = vendor
        raw = _load(HERE / vendor.filename)
        self.published = copy.deepcopy(raw)
        for fix in vendor.corrections:
            fix.apply(raw)
        self.closed: list[str] = self._close_bodies(raw) if vendor.close_bodies else []
        self.doc = raw
        # RunPod v2 answers errors as RFC 9457 application/problem+json: JSON, as openapi-core
        # decodes only application/json by itself.
        config = Config(extra_media_type_deserializers={"application/problem+json": json.loads})
        if not vendor.check_spec:
            config.spec_validator_cls = None
        self.app = OpenAPI.from_dict(raw, config=config)
        split = urlsplit(vendor.server)
        self._host, self._base = f"{split.scheme}://{split.netloc}", split.path.rstrip("/")
        self._routes = [(t, _template_regex(t)) for t in raw["paths"]]

    # -------------------------------------------------------------- lookups
    @staticmethod
    def _close_bodies(doc: dict[str, Any]) -> list[str]:
        closed = []
        for template, item in doc["paths"].items():
            for method, op in item.items():
                if method not in METHODS or not isinstance(op, dict):
                    continue
                schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
                if not isinstance(schema, dict) or "$ref" in schema or "properties" not in schema:
                    continue
                if "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
                    schema["additionalProperties"] = False
                    closed.append(f"{method.upper()} {template}")
        return closed

    def _path(self, path: str) -> str:
        if self.vendor.strip_trailing_slash and path != "/" and path.endswith("/"):
            path = path.rstrip("/")
        return path

    def _find(self, method: str, path: str) -> tuple[str, dict[str, Any]] | str:
        """(path template, operation) of METHOD path, or why the document has none."""
        path = self._path(path)
        matches = [t for t, rx in self._routes if rx.match(path)]
        matches.sort(key=lambda t: t.count("{"))  # a literal segment wins over a parameter
        for template in matches:
            op = self.doc["paths"][template].get(method.lower())
            if isinstance(op, dict):
                return template, op
        return "no such path in the document" if not matches else f"no {method.upper()} on {matches[0]} in the document"

    def route(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        """(path template, operation) of METHOD path; ContractError when the document has none."""
        found = self._find(method, path)
        if isinstance(found, str):
            raise ContractError(f"{self.vendor.name}: {method.upper()} {self._path(path)}: {found}")
        return found

    def _resolve(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            target: Any = self.doc
            for part in ref.lstrip("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def query_names(self, method: str, path: str) -> set[str]:
        template, op = self.route(method, path)
        params = [*self.doc["paths"][template].get("parameters", []), *op.get("parameters", [])]
        return {p["name"] for p in map(self._resolve, params) if p.get("in") == "query"}

    def body_fields(self, method: str, path: str) -> set[str]:
        """Top-level fields the request body schema names (through allOf and $ref)."""
        _, op = self.route(method, path)
        schema = self._resolve((op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema"))
        names: set[str] = set()
        stack = [schema]
        while stack:
            node = self._resolve(stack.pop())
            if isinstance(node, dict):
                names.update(node.get("properties", {}))
                stack.extend(node.get("allOf", []))
        return names

    def operation_id(self, method: str, path: str) -> str:
        return str(self.route(method, path)[1].get("operationId", ""))

    # -------------------------------------------------------------- checks
    def _request(self, method: str, path: str, query: Mapping[str, Any] | None, body: Any,
                 headers: Mapping[str, str] | None, content_type: str) -> MockRequest:
        data = None if body is None else json.dumps(body).encode()
        args = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (query or {}).items()}
        return MockRequest(self._host, method, self._base + self._path(path), args=args, headers=dict(headers or {}),
                           data=data, content_type=content_type)

    def request_errors(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body: Any = None,
                       headers: Mapping[str, str] | None = None, content_type: str = "application/json") -> list[str]:
        """Every way the request breaks the document (empty when it conforms).

        `path` is relative to the document's server URL and carries no query string; `query`
        values that are not strings are sent JSON-encoded (Vast.ai's `select_filters`).
        """
        found = self._find(method, path)
        if isinstance(found, str):
            return [found]
        op = found[1]
        errors = [f"query {name!r}: not a parameter of this operation"
                  for name in sorted(set(query or {}) - self.query_names(method, path))]
        request = self._request(method, path, query, body, headers, content_type)
        for exc in self.app.iter_request_errors(request):
            errors.extend(_schema_errors(exc))
        check = self.vendor.extra_checks.get(str(op.get("operationId")))
        if check is not None:
            errors.extend(check(body))
        return errors

    def check_request(self, method: str, path: str, **kwargs: Any) -> str:
        """Raise ContractError unless the request conforms; returns the operationId."""
        errors = self.request_errors(method, path, **kwargs)
        if errors:
            raise ContractError(f"{self.vendor.name}: {method.upper()} {self._path(path)}: " + "; ".join(errors))
        return self.operation_id(method, path)

    def response_errors(self, method: str, path: str, status: int, body: Any = None, *,
                        headers: Mapping[str, str] | None = None, content_type: str = "application/json") -> list[str]:
        """Every way the response breaks the document (empty when it conforms)."""
        found = self._find(method, path)
        if isinstance(found, str):
            return [found]
        request = self._request(method, path, None, None, None, "application/json")
        data = b"" if body is None else json.dumps(body).encode()
        response = MockResponse(data, status_code=status, headers=dict(headers or {}), content_type=content_type)
        errors: list[str] = []
        for exc in self.app.iter_response_errors(request, response):
            errors.extend(_schema_errors(exc))
        return errors

    def check_response(self, method: str, path: str, status: int, body: Any = None, **kwargs: Any) -> None:
        """Raise ContractError unless the response is one the document allows."""
        errors = self.response_errors(method, path, status, body, **kwargs)
        if errors:
            raise ContractError(
                f"{self.vendor.name}: {method.upper()} {self._path(path)} -> {status}: " + "; ".join(errors)
            )


@lru_cache(maxsize=None)
def contract(name: str) -> Contract:
    """The contract of a vendored document: 'runpod-v2', 'vastai' or 'runpod-v1'."""
    if name not in DOCS:
        raise KeyError(f"no vendored document {name!r}; have {', '.join(DOCS)}")
    return Contract(DOCS[name])
