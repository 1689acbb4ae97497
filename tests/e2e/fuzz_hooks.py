"""Schemathesis hooks for ``test_openapi_fuzz``: the one rule of the API a schema cannot state.

``follow_up`` must name an ended task of the same tenant. Whether one does is in the event log,
not in the request, so a schema-valid body can rightly be answered ``422`` naming ``follow_up``
(the contract says so). This check is ``positive_data_acceptance`` with exactly that exception;
the test runs it in place of the built-in one.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _error_field(response: Any) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("field") if isinstance(error, dict) else None


@schemathesis.check
def positive_data_acceptance_but_follow_up(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schema-valid data is accepted, unless the only thing wrong is the task follow_up names."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if response.status_code == 422 and _error_field(response) == "follow_up":
            return None
        raise
