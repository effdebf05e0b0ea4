"""Typed JSON files: dataclasses written as JSON objects, and checked reads that name the bad field.

`metadata.json` (and a run's `model_info.json`) are read through `Fields`, so
a missing key or a value of the wrong type stops with the file's path, the
field's place (`splits.train.shards[3].file`) and the value found.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, NoReturn

MISSING = object()


def show(value: Any) -> str:
    """A value as JSON for an error message, cut at 40 characters."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


class Flat:
    """`to_json` of a dataclass whose fields are all JSON values: its fields, in order."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Fields:
    """A JSON object of a file and where it is in the file; typed reads that fail naming the field.

    Every failure raises `error` (a ValueError subclass the file's reader
    catches) with the file's path, the field's place and the value found.
    """

    def __init__(self, value: Any, where: str, path: str, error: type[ValueError] = ValueError):
        if not isinstance(value, Mapping):
            raise error(f"{path}: {where or 'the top level'} must be a JSON object, got {show(value)}")
        self.value, self.where, self.path, self.error = value, where, path, error

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, where: str, what: str, value: Any) -> NoReturn:
        raise self.error(f"{self.path}: {where} must be {what}, got {show(value)}")

    def get(self, key: str, default: Any = MISSING) -> Any:
        if key not in self.value:
            if default is MISSING:
                raise self.error(f"{self.path}: {self.at(key)} is missing")
            return default
        return self.value[key]

    def integer(self, key: str) -> int:
        v = self.get(key)
        if type(v) is not int:
            self.fail(self.at(key), "an integer", v)
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if type(v) not in (int, float):
            self.fail(self.at(key), "a number", v)
        return v

    def boolean(self, key: str) -> bool:
        v = self.get(key)
        if type(v) is not bool:
            self.fail(self.at(key), "true or false", v)
        return v

    def string(self, key: str, default: Any = MISSING) -> str:
        v = self.get(key, default)
        if type(v) is not str:
            self.fail(self.at(key), "a string", v)
        return v

    def obj(self, key: str, default: Any = MISSING) -> Fields:
        return Fields(self.get(key, default), self.at(key), self.path, self.error)

    def objects(self, key: str) -> list[Fields]:
        v = self.get(key)
        if not isinstance(v, list):
            self.fail(self.at(key), "a list", v)
        return [Fields(x, f"{self.at(key)}[{i}]", self.path, self.error) for i, x in enumerate(v)]

    def numbers(self, key: str, shape: tuple[int, ...]) -> Any:
        """A list (or list of lists) of numbers of the given shape."""
        v = self.get(key)

        def ok(x, dims):
            if not dims:
                return type(x) in (int, float)
            return isinstance(x, list) and len(x) == dims[0] and all(ok(e, dims[1:]) for e in x)

        if not ok(v, shape):
            kind = " numbers" if len(shape) == 1 else " lists of numbers"
            what = "a list of " + "x".join(map(str, shape)) + kind
            self.fail(self.at(key), what, v)
        return v


