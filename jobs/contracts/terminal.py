"""A state enum that publishes its terminal values in its JSON schema (``x-terminal``), so the API's
OpenAPI document tells clients (the dashboard) which states a record never leaves instead of each
keeping a list of its own. Used by the job states (orchestrator/states.py) and the trial states
(jobs/contracts/sweep_events.py); torch-free, as both sides need."""

from __future__ import annotations

from typing import Any


class PublishesTerminal:
    """Mixin for a ``(str, Enum)`` whose members have a ``terminal`` property."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        schema["x-terminal"] = [s.value for s in cls if s.terminal]  # type: ignore[attr-defined]
        return schema
