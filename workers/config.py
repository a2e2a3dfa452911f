"""Base class for the small typed configs each component owns.

Every component (model, compression, data, loop) defines its own ``Config`` next to the code that
uses it; ``jobs/specs.py`` composes them into a job spec. Unknown keys are errors and every field
carries bounds, so a typo in a spec fails before any Ray work starts.
"""

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
