"""One registry per extension point (predictor architectures, baselines, cache eviction policies, prefetch
strategies, cost profiles, model families, capture columns): a name -> component mapping filled by a decorator
in the module that defines the component. Adding a component is adding that module (or entry) and its test; the
params schema, the README tables and the parametrised tests read the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moe_prefetch.errors import PipelineError

T = TypeVar("T")


class Registry(Generic[T]):
    """Components of one kind by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind  # what the names are, for errors: "predictor architecture", "cache policy", ...
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under `name` (names are unique)."""

        def add(component: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = component
            return component

        return add

    def add(self, name: str, component: T) -> T:
        """Register a component that is a value rather than a definition (a preset, a table row)."""
        return self.register(name)(component)

    def get(self, name: str, key: str) -> T:
        """The component `name`, or a one-line error naming the params `key` and the accepted names."""
        if name not in self._items:
            raise PipelineError(f"{key}: unknown {self.kind} {name!r}; accepted: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):
        return self._items.items()

    def names(self) -> list[str]:
        return list(self._items)
