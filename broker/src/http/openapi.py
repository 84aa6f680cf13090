# Generates openapi.json (served at /api/2/openapi.json): python3 broker/src/http/openapi.py > broker/src/http/openapi.json
# tests/tests/http_openapi.rs checks the document against the running server.
import json
E = {"$ref": "#/components/responses/Error"}
def resp(codes, ok=None):
    out = {}
    desc = {
        200: "OK", 201: "Created (the value created; `Location` names it)", 202: "Accepted: routed, no answer awaited",
        204: "Done", 304: "Not modified (`If-None-Match` matched)", 400: "Bad request (Ditto error)",
        401: "Not authenticated (`WWW-Authenticate`)", 403: "Not allowed by the policy (Ditto error)",
        404: "Not found, or not readable by the requester (Ditto error)", 405: "Method not allowed on this resource",
        408: "No answer within `timeout`", 409: "Conflict (Ditto error)", 412: "A condition (`If-Match`, `If-None-Match`) failed",
        413: "Too large", 415: "PATCH needs `application/merge-patch+json`", 429: "Too many failed authentications from this source",
        500: "Internal error", 503: "Unavailable",
    }
    for c in codes:
        if c in (200, 201) and ok is not None:
            out[str(c)] = {"description": desc[c], "content": {"application/json": {"schema": ok}}}
        else:
            out[str(c)] = {"$ref": f"#/components/responses/R{c}"}
            SHARED[f"R{c}"] = ({"description": desc[c], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}} if c >= 400 else {"description": desc[c]})
    return out
SHARED = {}

AUTH = [{"basic": []}, {"bearer": [], "apiToken": []}, {"bearer": []}]
ANY = {"description": "any JSON value"}
def p(name, desc, schema=None):
    return {"name": name, "in": "path", "required": True, "description": desc, "schema": schema or {"type": "string"}}
def q(name, desc):
    return {"name": name, "in": "query", "required": False, "description": desc, "schema": {"type": "string"}}
H = lambda name, desc: {"name": name, "in": "header", "required": False, "description": desc, "schema": {"type": "string"}}
THING = p("thingId", "`namespace:name`")
POLICY = p("policyId", "`namespace:name`")
SOL = p("solutionId", "the solution's ID")
FIELDS = q("fields", "Ditto's field selector, e.g. `thingId,attributes/location,_revision`")
CONDITION = q("condition", "an RQL expression the thing (as the requester may read it) must satisfy, else 412, e.g. `eq(attributes/room,\"hall\")`")
COND = [H("If-Match", "entity tags (`\"rev:3\"`) or `*`"), H("If-None-Match", "entity tags or `*`"), H("correlation-id", "echoed in the answer"), CONDITION]
body = {"required": True, "content": {"application/json": {"schema": ANY}}}
patchbody = {"required": True, "content": {"application/merge-patch+json": {"schema": ANY}}}

paths = {}
def crud(path, params, tag, put=True, patch=True, delete=True, summary=""):
    ops = {}
    ops["get"] = {"tags": [tag], "summary": f"Retrieve {summary}", "parameters": params + [FIELDS] + COND, "responses": resp([200, 304, 400, 401, 404, 412, 429], ANY)}
    if put:
        ops["put"] = {"tags": [tag], "summary": f"Create or replace {summary}", "parameters": params + COND, "requestBody": body, "responses": resp([201, 204, 400, 401, 403, 404, 409, 412, 413, 429], ANY)}
    if patch:
        ops["patch"] = {"tags": [tag], "summary": f"Merge a JSON merge patch into {summary}", "parameters": params + COND, "requestBody": patchbody, "responses": resp([204, 400, 401, 403, 404, 409, 412, 413, 415, 429])}
    if delete:
        ops["delete"] = {"tags": [tag], "summary": f"Delete {summary}", "parameters": params + COND, "responses": resp([204, 400, 401, 403, 404, 409, 412, 429])}
    paths[path] = ops

paths["/api/2/things"] = {
    "get": {"tags": ["Things"], "summary": "Retrieve the things listed in `ids` (each cut to the requester's view; those it cannot read are left out), or with `Accept: text/event-stream` stream their changes as Server-Sent Events",
            "parameters": [q("ids", "comma-separated thing IDs (required without `Accept: text/event-stream`)"), FIELDS, q("namespaces", "SSE: comma-separated namespaces"), q("filter", "SSE: an RQL expression each change must satisfy"), H("Last-Event-ID", "SSE: resume from this event ID (milliseconds)")],
            "responses": dict(resp([200, 400, 401, 403, 429], {"type": "array", "items": ANY}), **{"200": {"description": "The things, or an event stream", "content": {"application/json": {"schema": {"type": "array", "items": ANY}}, "text/event-stream": {"schema": {"type": "string"}}}}})},
    "post": {"tags": ["Things"], "summary": "Create a thing with a generated name", "parameters": [q("namespace", "the namespace (default: the solution's first)")],
             "requestBody": {"required": False, "content": {"application/json": {"schema": ANY}}}, "responses": resp([201, 400, 401, 403, 404, 409, 413, 429], ANY)},
}
T = [THING]
crud("/api/2/things/{thingId}", T, "Things", summary="a thing")
for sub, extra, summ in [
    ("/policyId", [], "the thing's policy ID"), ("/definition", [], "the thing's definition"),
    ("/attributes", [], "the attributes"), ("/attributes/{attributePath}", [p("attributePath", "a JSON pointer below `attributes` (may hold `/`)")], "an attribute"),
    ("/features", [], "the features"), ("/features/{featureId}", [p("featureId", "a feature ID")], "a feature"),
    ("/features/{featureId}/definition", [p("featureId", "a feature ID")], "a feature's definition"),
    ("/features/{featureId}/properties", [p("featureId", "a feature ID")], "a feature's properties"),
    ("/features/{featureId}/properties/{propertyPath}", [p("featureId", "a feature ID"), p("propertyPath", "a JSON pointer below `properties`")], "a property"),
    ("/features/{featureId}/desiredProperties", [p("featureId", "a feature ID")], "a feature's desired properties"),
    ("/features/{featureId}/desiredProperties/{propertyPath}", [p("featureId", "a feature ID"), p("propertyPath", "a JSON pointer below `desiredProperties`")], "a desired property"),
]:
    crud("/api/2/things/{thingId}" + sub, T + extra, "Things", summary=summ)
MSG = {"tags": ["Messages"], "summary": "Send a live message; wait up to `timeout` seconds for the device's answer (its payload, content type and `status` user property), or 202 with `timeout=0`",
       "requestBody": {"required": False, "content": {"*/*": {"schema": {}}}},
       "responses": dict(resp([202, 400, 401, 403, 404, 408, 429]), **{"200": {"description": "The device's answer", "content": {"*/*": {"schema": {}}}}})}
for box in ["inbox", "outbox"]:
    m = dict(MSG); m["parameters"] = T + [p("messageSubject", "one path segment"), q("timeout", "seconds to wait for an answer (default 10, at most 60; 0: do not wait)"), H("correlation-id", "sent with the message"), H("response-required", "`false`: do not wait")]
    paths[f"/api/2/things/{{thingId}}/{box}/messages/{{messageSubject}}"] = {"post": m}
    m2 = dict(m); m2["parameters"] = m["parameters"] + [p("featureId", "a feature ID")]
    paths[f"/api/2/things/{{thingId}}/features/{{featureId}}/{box}/messages/{{messageSubject}}"] = {"post": m2}
P = [POLICY]
crud("/api/2/policies/{policyId}", P, "Policies", patch=False, summary="a policy")
for sub, extra, summ in [
    ("/entries", [], "the entries"), ("/entries/{label}", [p("label", "an entry label")], "an entry"),
    ("/entries/{label}/subjects", [p("label", "an entry label")], "an entry's subjects"),
    ("/entries/{label}/subjects/{subjectId}", [p("label", "an entry label"), p("subjectId", "e.g. `iot-things:acme:device-1`")], "a subject"),
    ("/entries/{label}/resources", [p("label", "an entry label")], "an entry's resources"),
    ("/entries/{label}/resources/{resourcePath}", [p("label", "an entry label"), p("resourcePath", "e.g. `thing:/features/lamp` (may hold `/`)")], "a resource"),
    ("/imports", [], "the imports"), ("/imports/{importedPolicyId}", [p("importedPolicyId", "a policy ID")], "an import"),
]:
    crud("/api/2/policies/{policyId}" + sub, P + extra, "Policies", patch=False, summary=summ)
S = [SOL]
def sol(get=None, put=None, post=None, delete=None, params=S):
    ops = {}
    if get: ops["get"] = {"tags": ["Solutions"], "summary": get, "parameters": params, "responses": resp([200, 401, 404, 429], ANY)}
    if put: ops["put"] = {"tags": ["Solutions"], "summary": put, "parameters": params, "requestBody": {"required": False, "content": {"application/json": {"schema": ANY}}}, "responses": resp([201, 204, 400, 401, 403, 404, 409, 429])}
    if post: ops["post"] = {"tags": ["Solutions"], "summary": post, "parameters": params, "responses": resp([201, 401, 403, 404, 429], {"type": "object", "properties": {"secretId": {"type": "string"}, "secret": {"type": "string"}}})}
    if delete: ops["delete"] = {"tags": ["Solutions"], "summary": delete, "parameters": params, "responses": resp([204, 401, 403, 404, 429])}
    return ops
paths["/api/2/solutions"] = {"post": {"tags": ["Solutions"], "summary": "Create a solution (operators of the config only: `Authorization: Basic operator/<name>:<secret>`); its API token and first secret are in this answer only",
    "security": [{"basic": []}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["namespaces"], "properties": {"solutionId": {"type": "string"}, "namespaces": {"type": "array", "items": {"type": "string"}}}}}}},
    "responses": resp([201, 400, 401, 409, 429], {"type": "object", "properties": {"solutionId": {"type": "string"}, "apiToken": {"type": "string"}, "secret": {"type": "string"}}})}}
paths["/api/2/solutions/{solutionId}"] = sol(get="The solution: namespaces and secret IDs (READ `solution:/`)")
paths["/api/2/solutions/{solutionId}/namespaces"] = sol(get="The namespaces (READ `solution:/namespaces`)")
paths["/api/2/solutions/{solutionId}/namespaces/{namespace}"] = sol(put="Add a namespace (WRITE `solution:/namespaces`)", delete="Remove a namespace: its things are out of reach at once", params=S + [p("namespace", "e.g. `org.acme.fleet`")])
paths["/api/2/solutions/{solutionId}/secrets"] = sol(get="The secrets' IDs (READ `solution:/secrets`)", post="Create a secret: shown once, in this answer (WRITE `solution:/secrets`)")
paths["/api/2/solutions/{solutionId}/secrets/{secretId}"] = sol(delete="Revoke a secret: the connections opened with it end", params=S + [p("secretId", "e.g. `s2`")])
paths["/api/2/solutions/{solutionId}/policy"] = {"get": sol(get="The solution policy (READ `solution:/policy`)")["get"],
    "put": {"tags": ["Solutions"], "summary": "Replace the solution policy (WRITE `solution:/policy`); applies to live connections at once", "parameters": S, "requestBody": body, "responses": resp([204, 400, 401, 403, 404, 429])}}
paths["/api/2/solutions/{solutionId}/clients"] = sol(get="The sessions of the solution's clients (READ `solution:/clients`)")
paths["/api/2/solutions/{solutionId}/usage"] = sol(get="Usage counters (READ `solution:/usage`)")
CONN = p("connectionId", "the connection's ID (1 to 64 letters, digits, `-`, `_`, `.`)")
CREF = {"$ref": "#/components/schemas/Connection"}
cbody = lambda desc: {"required": True, "description": desc, "content": {"application/json": {"schema": CREF}}}
CREATED = {"type": "object", "required": ["id"], "properties": {"id": {"type": "string", "description": "the connection's ID"}}}
paths["/api/2/solutions/{solutionId}/connections"] = {
    "get": {"tags": ["Connections"], "summary": "The solution's connections to external brokers, passwords shown as `***` (READ `solution:/connections`)", "parameters": S,
            "responses": resp([200, 401, 404, 429], {"type": "array", "items": CREF})},
    "post": {"tags": ["Connections"], "summary": "Create a connection; without `id` it gets a generated one (`c-<8 hex>`); an existing `id` is 409 (WRITE `solution:/connections/<id>`). Started at once if `open`", "parameters": S,
             "requestBody": cbody("the connection (`id` optional)"), "responses": resp([201, 400, 401, 403, 404, 409, 413, 429], CREATED)}}
paths["/api/2/solutions/{solutionId}/connections/{connectionId}"] = {
    "get": {"tags": ["Connections"], "summary": "A connection, its password shown as `***` (READ `solution:/connections/<id>`)", "parameters": S + [CONN], "responses": resp([200, 401, 404, 429], CREF)},
    "put": {"tags": ["Connections"], "summary": "Create or replace a connection (WRITE `solution:/connections/<id>`); the body's `id`, if any, must be the URL's; a URI whose password is `***` (as shown) keeps the stored password. A changed connection is restarted at once", "parameters": S + [CONN],
            "requestBody": cbody("the connection"), "responses": resp([201, 204, 400, 401, 403, 404, 409, 413, 429], CREATED)},
    "delete": {"tags": ["Connections"], "summary": "Delete a connection: it stops at once (WRITE `solution:/connections/<id>`)", "parameters": S + [CONN], "responses": resp([204, 401, 403, 404, 429])}}
paths["/api/2/solutions/{solutionId}/connections/{connectionId}/status"] = {
    "get": {"tags": ["Connections"], "summary": "A connection's state and counters in this server (READ `solution:/connections/<id>/status`)", "parameters": S + [CONN],
            "responses": resp([200, 401, 404, 429], {"$ref": "#/components/schemas/ConnectionStatus"})}}
for op in (paths["/api/2/solutions/{solutionId}/connections"]["post"], paths["/api/2/solutions/{solutionId}/connections/{connectionId}"]["put"]):
    op["responses"]["201"]["description"] = "Created: the connection's ID (no `Location`)"
TEMPLATE = lambda desc: {"type": "string", "description": desc}
SUBJECTS = lambda desc: {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": desc}
HEADERS = lambda desc: {"type": "object", "additionalProperties": {"type": "string"}, "description": desc}
CONNECTION_SCHEMAS = {
    "Connection": {"type": "object", "additionalProperties": False, "required": ["id", "connectionType", "uri"],
        "description": "A connection to an external broker (Ditto's connection shape where it fits). Unknown fields are refused (400 `connectivity:connection.configuration.invalid`, the message naming the field).",
        "example": {"id": "hub", "connectionType": "amqp-091", "connectionStatus": "open", "uri": "amqp://hub:***@hub.example:5672/%2f",
                    "sources": [{"addresses": ["telemetry"], "authorizationContext": ["integration:{{ header:device_id }}"], "enforcement": {"input": "{{ header:device_id }}", "filters": ["{{ thing:id }}"]}}],
                    "targets": [{"address": "amq.topic/{{ thing:namespace }}.{{ thing:name }}.{{ topic:action }}", "topics": ["_/_/things/twin/events"], "authorizationContext": ["integration:acme:hub"]}]},
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            "name": {"type": "string"},
            "connectionType": {"type": "string", "enum": ["amqp-091", "mqtt", "mqtt-5"]},
            "connectionStatus": {"type": "string", "enum": ["open", "closed"], "default": "open", "description": "`closed`: kept, not connected"},
            "uri": {"type": "string", "description": "`amqp://user:password@host:5672/vhost` or `mqtt://user:password@host:1883` (plain TCP: TLS is not supported yet); the password is shown as `***`"},
            "sources": {"type": "array", "maxItems": 16, "items": {"$ref": "#/components/schemas/ConnectionSource"}},
            "targets": {"type": "array", "maxItems": 16, "items": {"$ref": "#/components/schemas/ConnectionTarget"}},
            "specificConfig": {"type": "object", "additionalProperties": {"type": "string"}, "description": "`clientId` (MQTT; default `thingsgate-<solution>-<id>`)"}}},
    "ConnectionSource": {"type": "object", "additionalProperties": False, "required": ["addresses", "authorizationContext"], "description": "Where Ditto envelopes (commands) are consumed from",
        "properties": {
            "addresses": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "AMQP queue names, or MQTT topic filters"},
            "authorizationContext": SUBJECTS("the subjects a consumed command is authorized as; `{{ header:<name> }}` placeholders"),
            "enforcement": {"type": "object", "additionalProperties": False, "required": ["input", "filters"], "description": "the consumed message's `input` must equal one of `filters` resolved for the addressed thing (else `connection.id.enforcement.failed`)",
                "properties": {"input": TEMPLATE("e.g. `{{ header:device_id }}`"), "filters": {"type": "array", "items": TEMPLATE("e.g. `{{ thing:id }}`"), "minItems": 1}}},
            "qos": {"type": "integer", "minimum": 0, "maximum": 2, "description": "MQTT only (default 1)"},
            "prefetch": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "AMQP only (default 100)"},
            "headerMapping": HEADERS("extra headers computed from the consumed message's (`{{ header:… }}`)")}},
    "ConnectionTarget": {"type": "object", "additionalProperties": False, "required": ["address", "topics", "authorizationContext"], "description": "Where events and live messages are published",
        "properties": {
            "address": TEMPLATE("AMQP: `exchange/routing-key` (or `exchange`); MQTT: a topic. `{{ thing:… }}` and `{{ topic:… }}` placeholders"),
            "topics": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["_/_/things/twin/events", "_/_/things/live/messages"]}, "description": "optionally with `?namespaces=a,b`"},
            "authorizationContext": SUBJECTS("the subjects whose view of each event or message is published"),
            "qos": {"type": "integer", "minimum": 0, "maximum": 2, "description": "MQTT only (default 1)"},
            "headerMapping": HEADERS("headers (AMQP) or user properties (MQTT 5) set on each published message")}},
    "ConnectionStatus": {"type": "object", "required": ["id", "status"], "description": "A connection's state in this server; only `id` and `status` (`connecting`) right after it was stored",
        "properties": {
            "id": {"type": "string"},
            "connectionType": {"type": "string", "enum": ["amqp-091", "mqtt", "mqtt-5"]},
            "address": {"type": "string", "description": "`host:port` of the external broker (never its credentials)"},
            "status": {"type": "string", "enum": ["connecting", "connected", "failed", "closed"]},
            "since": {"type": "string", "format": "date-time", "description": "when it entered this state"},
            "lastError": {"type": "string", "description": "why the last attempt failed (`failed` only); it is retried after a backoff"},
            "connects": {"type": "integer", "description": "connects that succeeded"},
            "counters": {"type": "object", "description": "messages since the connection (re)started",
                "properties": {k: {"type": "integer", "description": d} for k, d in [("in", "commands consumed and applied, or answered with an error"), ("out", "events and messages published to targets (confirmed)"), ("denied", "refused: not authorized, or by the enforcement"), ("failed", "malformed, unresolvable, store failures, timeouts"), ("dropped", "dropped at a full target buffer"), ("replies", "answers sent to reply addresses")]}}}},
}
paths["/api/2/openapi.json"] = {"get": {"tags": ["Operations"], "summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.0"}}}}
paths["/metrics"] = {"get": {"tags": ["Operations"], "summary": "Prometheus metrics (OpenMetrics text)", "security": [], "responses": {"200": {"description": "metrics"}}}}
paths["/health"] = {"get": {"tags": ["Operations"], "summary": "The process serves", "security": [], "responses": {"200": {"description": "ok"}}}}
paths["/ready"] = {"get": {"tags": ["Operations"], "summary": "Ready: the store is open and the listeners are up", "security": [], "responses": {"200": {"description": "ready"}, "503": {"description": "shutting down"}}}}
paths["/mqtt"] = {"get": {"tags": ["Operations"], "summary": "MQTT over WebSockets (subprotocol `mqtt`); authentication is MQTT's CONNECT", "security": [], "responses": {"101": {"description": "Switching protocols"}, "400": {"description": "Not a WebSocket upgrade offering `mqtt`"}, "503": {"description": "No handshake slot, or shutting down"}}}}

doc = {
  "openapi": "3.0.3",
  "info": {"title": "Thingsgate HTTP API", "version": "2", "description": "Ditto-compatible twin API, live messages, Server-Sent Events, solution administration (including connections to external brokers). Every `/api/2` request is authenticated: `Authorization: Basic <solutionId:secret>`, or `Authorization: Bearer <JWT>` with `x-cr-api-token` unless the token names its solution. The API token alone grants nothing."},
  "security": AUTH,
  "paths": paths,
  "components": {
    "securitySchemes": {
      "basic": {"type": "http", "scheme": "basic", "description": "solution ID and a solution secret"},
      "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
      "apiToken": {"type": "apiKey", "in": "header", "name": "x-cr-api-token", "description": "identifies the solution of a token without solution claim; grants nothing alone"}
    },
    "schemas": dict({"Error": {"type": "object", "required": ["status", "error", "message"], "properties": {"status": {"type": "integer"}, "error": {"type": "string", "example": "things:thing.notfound"}, "message": {"type": "string"}, "description": {"type": "string"}}}}, **CONNECTION_SCHEMAS),
    "responses": SHARED
  }
}
PARAMS = {}
for ops in paths.values():
    for op in ops.values():
        refs = []
        for prm in op.get("parameters", []):
            key = (prm["in"] + "_" + prm["name"]).replace("-", "_")
            PARAMS.setdefault(key, prm)
            refs.append({"$ref": f"#/components/parameters/{key}"})
        if "parameters" in op:
            op["parameters"] = refs
doc["components"]["parameters"] = PARAMS
print(json.dumps(doc, indent=1, sort_keys=False))
