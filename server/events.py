"""Events a component reports to whoever subscribes, so it never calls up into the code that owns it: the
engine reports health changes and lost adapters; the app (health) and the adapter registry (forget) listen."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

Subscriber = Callable[[T], Awaitable[None] | None]


class Signal(Generic[T]):
    """One kind of event. Subscribers run in the order they subscribed; an async one is awaited before the
    next runs, so the reporter goes on only once every subscriber has taken the event in."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber[T]] = []

    def subscribe(self, subscriber: Subscriber[T]) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber[T]) -> None:
        self._subscribers.remove(subscriber)

    async def emit(self, value: T) -> None:
        for subscriber in list(self._subscribers):
            result = subscriber(value)
            if inspect.isawaitable(result):
                await result
