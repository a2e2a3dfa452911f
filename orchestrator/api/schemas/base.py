"""What every API schema shares: the one request base class (``Request``: unknown fields refused, every
string encodable and every number finite, checked before any field), the response base (``Schema``),
the one ``Name`` type of team, user and pool names, the id patterns, and the error body (``Problem``)."""

from __future__ import annotations

from itertools import islice
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from jobs.specs.base import NAME_MAX_CHARS, NAME_PATTERN
from orchestrator.api.errors import MAX_REPORTED_ERRORS, unencodable

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TOKEN_ID_PATTERN = r"^tok_[0-9a-f]{1,32}$"
# Printable ASCII without spaces, as in the IETF Idempotency-Key draft's examples.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"


Priority = Literal["low", "normal", "high"]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# On an int field: pydantic's lax mode reads false as 0; strict mode refuses 8.0, which JSON
# Schema's "integer" allows. Only the boolean is refused.
NOT_BOOL = BeforeValidator(_not_bool)
# Team, user, pool and deployment names: short, printable, safe in paths, logs and audit lines.
Name = Annotated[str, Field(max_length=NAME_MAX_CHARS, pattern=NAME_PATTERN)]
# The ``?team=`` filter of every list.
TeamFilter = Annotated[str | None, Query(pattern=NAME_PATTERN, description="filter by team (users: own team only)")]

_SURROGATE_ERROR = PydanticCustomError(
    "string_surrogate", "String should not hold a lone UTF-16 surrogate (it has no UTF-8 encoding)")


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Request(Schema):
    """A request body."""

    @model_validator(mode="wrap")
    @classmethod
    def _encodable(cls, data: Any, handler: Any) -> Any:
        """Every string valid Unicode and every number finite, anywhere in the body: checked on the
        decoded JSON before the fields and before a subclass's own validators (a wrap validator of the
        base runs first), so that a value that could be neither stored nor echoed (see errors.py) is a
        422 at its own location, even in a field that takes any string."""
        errors: list[InitErrorDetails] = [
            {"type": _SURROGATE_ERROR if kind == "surrogate" else "finite_number", "loc": loc, "input": value}
            for loc, kind, value in islice(unencodable(data), MAX_REPORTED_ERRORS)
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return handler(data)


class Health(Schema):
    status: Literal["ok"]


class Problem(Schema):
    detail: str
