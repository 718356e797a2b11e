"""Schemathesis fuzzes the directory API's OpenAPI with an operator token: never a 5xx."""

from __future__ import annotations

import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.integration.routing.conftest import RunningRouting

pytestmark = pytest.mark.integration

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}


def fuzz(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base: str,
    session: requests.Session,
    headers: dict[str, str],
    calls: dict[str, set[int]],
) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        body_ura = case.body.get("ura") if isinstance(case.body, dict) else None
        if mode is GenerationMode.POSITIVE and case.method == "PUT" and isinstance(body_ura, str):
            # The schema cannot say "the path's URA is the body's": without this nearly every
            # generated entry is refused for the mismatch and the rest of it never checked.
            case.path_parameters = {**(case.path_parameters or {}), "ura": body_ura}
        response = case.call_and_validate(
            base_url=base,
            session=session,
            headers=headers,
            checks=[not_a_server_error],
            timeout=30,
        )
        calls.setdefault(operation.label, set()).add(response.status_code)

    call()


def test_no_request_the_schema_allows_or_breaks_makes_the_api_fail(
    routing_api: RunningRouting,
) -> None:
    base = routing_api.base_url
    deadline = time.monotonic() + 30
    while requests.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the directory view did not catch up"
        time.sleep(0.1)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = routing_api.headers("operator")
    session = requests.Session()
    calls: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /providers",
        "GET /providers/{ura}",
        "PUT /providers/{ura}",
        "DELETE /providers/{ura}",
    }
    started = time.monotonic()
    for operation in operations:
        # Operations without parameters or body (health, metrics) have nothing to break.
        modes = EXAMPLES if operation.path.startswith("/providers") else [GenerationMode.POSITIVE]
        for mode in modes:
            fuzz(operation, mode, base, session, headers, calls)
    assert time.monotonic() - started < 60
    # The token was accepted and the fuzz got past it: some entries were refused for what they
    # said (422), some stored (201/200); a run that only met 401s would prove nothing.
    assert 422 in calls["PUT /providers/{ura}"]
    assert calls["PUT /providers/{ura}"] & {200, 201}, calls
    assert 200 in calls["GET /providers"]
