"""The ``brevity:`` section of a run config."""
from pydantic import Field

from metareason.api import Section


class BrevitySection(Section):
    enabled: bool = False  # every hook is a no-op unless this is set
    hint: str = "Answer briefly. "  # put before the user's text of every prompt
    max_chars: int = Field(32, gt=0)  # a completion up to this long gets the full reward
