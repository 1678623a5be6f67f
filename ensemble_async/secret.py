"""A string wrapper for API keys that never shows its value in repr, str or logs."""

from __future__ import annotations

import os

__all__ = ["MissingSecretError", "Secret", "resolve_key"]


class MissingSecretError(KeyError):
    """The environment variable that should hold a key is not set."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing secret"


class Secret:
    __slots__ = ("_source", "_value")

    def __init__(self, value: str, *, source: str = "value") -> None:
        self._value = value
        self._source = source

    @classmethod
    def from_env(cls, variable: str) -> Secret:
        value = os.environ.get(variable)
        if value is None or value == "":
            raise MissingSecretError(f"environment variable {variable} is not set")
        return cls(value, source=f"${variable}")

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self._source}, '***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values cannot be pickled")


def resolve_key(api_key: Secret | str | None, api_key_env: str | None) -> Secret | None:
    """The key an adapter was given: a value, or the name of the environment variable
    that holds it (never both)."""
    if api_key is not None and api_key_env is not None:
        raise ValueError("give api_key or api_key_env, not both")
    if api_key_env is not None:
        return Secret.from_env(api_key_env)
    return Secret(api_key, source="argument") if isinstance(api_key, str) else api_key
