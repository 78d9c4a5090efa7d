"""The event stream of one generation request, as :meth:`generate` of the engine returns it.

The engine pushes :class:`TokenEvent` s into the request's queue; this iterator
hands them out and, when closed (or cancelled while waiting) before the final
event, cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from modelkiln.serve.generation.api import TokenEvent


class RequestStream:
    """Async iterator over one request's events; closing it early cancels the request."""

    def __init__(self, queue: asyncio.Queue[TokenEvent], cancel: Callable[[], object]) -> None:
        self._queue = queue
        self._cancel = cancel
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if event.finish_reason is not None:
            self._finished = True
        return event

    def ready(self) -> list[TokenEvent]:
        """The events already waiting, without waiting for more (empty when none or finished).

        Lets a consumer that fell behind the engine answer several tokens at once.
        """
        out: list[TokenEvent] = []
        queue = self._queue
        while not self._finished and not queue.empty():
            event = queue.get_nowait()
            self._finished = event.finish_reason is not None
            out.append(event)
        return out

    async def aclose(self) -> None:
        """Cancel the request if it is still running (client went away)."""
        if not self._finished:
            self._finished = True
            self._cancel()
