"""Schemathesis fuzzes the consent API's OpenAPI with a valid token: no request gets a 5xx.

Cases are drawn with Hypothesis directly (schemathesis' lazy pytest integration does not run
under pytest 9), from every operation, data that fits the schema and data that does not.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.integration.consent.conftest import HOSPITAL, RunningConsent

pytestmark = pytest.mark.integration

ALL_ROLES = ("provider", "consent-authority", "operator")


# schemathesis' own strategies draw from the `random` module, which Hypothesis deprecates.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
def test_no_request_makes_the_consent_api_fail(consent_service: RunningConsent) -> None:
    schema = schemathesis.openapi.from_url(f"{consent_service.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {operation.path for operation in operations}
    assert {"/mitz/notifications", "/consent-queries", "/treatment-relationships"} <= paths
    strategies = [
        operation.as_strategy(mode)
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    headers = consent_service.auth(HOSPITAL, ALL_ROLES)
    statuses: set[int] = set()

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=consent_service.base_url, headers=headers, timeout=30)
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    # The fuzzing reached past authentication and validation into the handlers.
    assert statuses & {200, 201}, statuses
