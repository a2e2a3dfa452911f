"""Schemathesis against the running app (real HTTP on loopback, fake Ray) with every check: no 5xx,
every response matches the OpenAPI document (status codes, content types, bodies, ``Allow``), and
every request that breaks the document (a wrong type, an undeclared query parameter) is refused.

The schema is the app's own document, loaded at import (schemathesis' lazy fixture loader does not
work with pytest 9); the requests go to a live server started once for the module.

Schemathesis only generates what JSON can carry (no lone surrogates, no NaN), so a second,
Hypothesis-driven test posts raw bodies that do: ``\\udXXX`` escapes of lone surrogates and the
``NaN`` / ``Infinity`` / ``-Infinity`` tokens that Python's json module accepts.
"""

from __future__ import annotations

import copy
import json
import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis.checks import positive_data_acceptance

from jobs.specs.train import TrainSpec
from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from tests.support.control_plane import AUTH, TINY_SPEC, TOKEN
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer

MAX_EXAMPLES = 20  # per operation: the whole run stays well under a minute on 2 cores
MAX_RAW_EXAMPLES = 150
REQUEST_TIMEOUT_S = 30.0
# Every check runs, but one on the routes that create: a spec has cross-field rules (e.g.
# resources.expert_parallel divides num_workers) that JSON Schema cannot state, so a schema-valid
# spec may rightly get a 422 naming them (positive_data_acceptance would call that a fault).
EXCLUDED_FOR_SUBMIT = [positive_data_acceptance]


def _app(state_dir):
    return create_app(Settings(api_token=TOKEN, state_dir=state_dir, reconcile_interval_s=0.05, follow_max_s=2.0,
                               ray_address=None), ray=FakeRay(auto_run=True))


def _document() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        app = _app(d)
        doc = app.openapi()
        app.state.store.close()
    return doc


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def _text_params(method: str, path: str) -> set[str]:
    """The query parameters of an operation whose schema is text (alone, or in a list): any value
    goes out as text on the wire, so a "wrong type" one arrives as a valid string."""
    names = set()
    for p in DOCUMENT["paths"].get(path, {}).get(method.lower(), {}).get("parameters", []):
        kinds = {s.get("type") for s in [p["schema"], *p["schema"].get("anyOf", [])]}
        kinds |= {s.get("items", {}).get("type") for s in [p["schema"], *p["schema"].get("anyOf", [])]}
        if p["in"] == "query" and "string" in kinds and not kinds & {"integer", "number", "boolean"}:
            names.add(p["name"])
    return names


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    app = _app(tmp_path_factory.mktemp("fuzz"))
    with BackgroundServer(app) as url:
        yield url
    app.state.store.close()


# (PUT /v1/teams: quota keys are pool names, a rule OpenAPI 3.0 cannot state for a map's keys.)
CREATING_ROUTES = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/sweeps"), ("POST", "/v1/deployments"),
                             ("POST", "/v1/sweeps/{sweep_id}/promote"), ("PUT", "/v1/teams/{team}")})


def _sent(value) -> bool:
    return any(v is not None for v in value) if isinstance(value, list) else value is not None


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_api_never_answers_5xx_and_matches_its_schema(case, live_url):
    # Creating routes may refuse a schema-valid body for reasons a schema cannot say (a path that does
    # not exist, outside the team's data roots, a cross-field rule of the spec): 422, never 5xx.
    submit = (case.method.upper(), case.path) in CREATING_ROUTES
    # The HTTP client sends no parameter for a query value of None or [] (or a list of None), so a
    # "schema-violating" case whose violation is such a parameter goes out valid and is rightly accepted.
    assume(all(_sent(v) for v in (case.query or {}).values()))
    text = _text_params(case.method, case.path)
    assume(all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
               for k, v in (case.query or {}).items() if k in text))
    case.call_and_validate(base_url=live_url, headers=AUTH, timeout=30,
                           excluded_checks=EXCLUDED_FOR_SUBMIT if submit else [])


# -- raw bodies with values JSON cannot carry ------------------------------------------------------


def _field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field of the spec, sections and leaves, as body locations."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        paths.append(path)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths.extend(_field_paths(field.annotation, path))
    return paths


BODY_PATHS = [("max_retries",), ("kind",), ("spec",), *_field_paths(TrainSpec, ("spec",))]
LONE_SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
UNENCODABLE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.tuples(st.text(max_size=4), LONE_SURROGATES, st.text(max_size=4)).map("".join),
)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8),
                        UNENCODABLE)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6) | LONE_SURROGATES, inner, max_size=3), max_leaves=8)


def _put(body: dict, path: tuple[str, ...], value) -> None:
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _strict_json(response: httpx.Response):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in a response")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


@given(noise=st.lists(st.tuples(st.sampled_from(BODY_PATHS), JSON_VALUES), max_size=3),
       path=st.sampled_from(BODY_PATHS), bad=UNENCODABLE)
@settings(max_examples=MAX_RAW_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_unencodable_values_anywhere_in_a_body_are_422_naming_them(live_url, noise, path, bad):
    """A valid spec with random values (some unencodable) in random fields, then one unencodable
    value at ``path``: always a 422 in standard JSON that names ``path``, and no job stored."""
    body = {"spec": copy.deepcopy(TINY_SPEC)}
    for noise_path, value in noise:
        _put(body, noise_path, value)
    _put(body, path, bad)
    raw = json.dumps(body, allow_nan=True).encode()  # ASCII, with \udXXX escapes and bare NaN tokens
    with httpx.Client(base_url=live_url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as client:
        before = client.get("/v1/jobs", params={"limit": 1}).json()["count"]
        r = client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.status_code, r.text)
        assert ["body", *path] in [e["loc"] for e in _strict_json(r)["detail"]]
        assert client.get("/v1/jobs", params={"limit": 1}).json()["count"] == before
