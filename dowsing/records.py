"""The JSON form of dowsing's configuration and result dataclasses, written
once: configurations turn tuples into lists and refuse unknown fields by
name; results write non-finite numbers as null and ignore fields they do not
know (an older or newer file still loads)."""
from __future__ import annotations

import dataclasses
import json

from .result import finite_or_none


def plain(value):
    """Tuples as lists, all the way down: what a JSON round trip gives back."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class ConfigRecord:
    """Mixed into a frozen configuration dataclass; `record_name` names it in
    the error for unknown fields."""

    record_name = "config"

    def to_dict(self) -> dict:
        # plain JSON types, so a dict survives a JSON round trip unchanged
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.record_name} fields: {', '.join(sorted(unknown))}")
        return cls(**data)


class ResultRecord:
    """Mixed into a result dataclass."""

    def to_dict(self) -> dict:
        return finite_or_none(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))
