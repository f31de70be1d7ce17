"""TODO docstring."""

from __future__ import annotations

from __future__ import annotations

from typing import List




class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


def check_choice(errors: List[str], field: str, value, choices) -> None:
  if value not in choices:
    errors.append(f'{field}={value!r} is unknown; use one of {tuple(choices)}.')
