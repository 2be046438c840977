"""An asyncio event loop whose clock is simulated: the discrete-event scheduler of
``--mode virtual``.

``loop.time()`` is virtual. When no callback is ready the loop jumps straight to
the next timer instead of sleeping, so code under it (``asyncio.sleep``, timeouts,
``call_later``) runs exactly as it would in real time, only without the waiting.

Why our own loop and not a package: looptime (PyPI) patches a loop for tests; it
still polls real I/O every cycle and waits real time when idle, where a simulation
wants no syscall per step, an exact count of events, and a hard error on deadlock.
This is CPython's ``BaseEventLoop._run_once`` with the select replaced by a clock
jump, and its timers and the network's deliveries in heaps of plain tuples (it
drives the same private fields; checked on 3.11).

Real file descriptors still work for the two things asyncio uses them for under
us: signals (Ctrl-C, through the self-pipe) and ``call_soon_threadsafe``. They are
polled, without waiting, whenever the clock is about to jump.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import selectors
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# CPython's thresholds for compacting a timer heap full of cancelled timeouts.
_MIN_SCHEDULED = 100
_CANCELLED_FRACTION = 0.5
# On an apparent deadlock, wait this long (real time) for a thread to call back
# before giving up: nothing under the loop should use threads, but a stray one
# must not be mistaken for a deadlock.
DEADLOCK_GRACE = 1.0
POLL_EVERY = 256  # idle steps between polls of the real fds (Ctrl-C within ~ms)
START = 100_000.0  # virtual seconds at start: far from 0, which code may read as "never"


class VirtualTimeDeadlock(RuntimeError):
    """Nothing is ready and no timer is pending, yet the run is not done."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    # CPython's private fields this loop drives (BaseEventLoop, BaseSelectorEventLoop).
    _ready: deque[Any]
    _timer_cancelled_count: int
    _stopping: bool
    _selector: selectors.BaseSelector

    def __init__(self, start: float = START) -> None:
        super().__init__()
        self._vnow = start
        self._clock_resolution = 0.0
        self.events = 0  # callbacks run (task steps, timers, deliveries)
        self.jumps = 0  # clock advances
        self.wall_started = time.perf_counter()
        # Network deliveries: (when, seq, fn, args) tuples, cheaper than TimerHandles
        # (no Python-level __lt__, no context copy); the seq keeps ties in FIFO order.
        self._net: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Any]] = []  # instead of BaseEventLoop's
        self._idle = 0

    def call_net(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at loop time ``when`` (a packet's arrival); not cancellable."""
        heapq.heappush(self._net, (when, next(self._seq), fn, args))

    def time(self) -> float:
        return self._vnow

    def call_at(  # type: ignore[override]  # typeshed's TypeVarTuple signature, same calls
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        # Timers in a heap of (when, seq, handle) tuples: compared in C, FIFO on ties
        # (TimerHandle's own __lt__ is Python and was a top cost at 10k nodes).
        self._check_closed()  # type: ignore[attr-defined]
        timer = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def _run_once(self) -> None:
        timers = self._timers
        ready = self._ready
        net = self._net
        if (
            len(timers) > _MIN_SCHEDULED
            and self._timer_cancelled_count / len(timers) > _CANCELLED_FRACTION
        ):
            kept = []
            for entry in timers:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._timers = timers = kept
            self._timer_cancelled_count = 0
        else:
            while timers and timers[0][2]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(timers)[2]._scheduled = False

        if not ready and not self._stopping:
            # Idle: real fds now and then (signals, threads: a syscall each time, so
            # not at every jump), then jump to the next timer or delivery.
            self._idle += 1
            if self._idle >= POLL_EVERY:
                self._idle = 0
                self._poll_fds(0)
            if not ready:
                if timers or net:
                    if not net:
                        when = timers[0][0]
                    elif not timers:
                        when = net[0][0]
                    else:
                        when = min(timers[0][0], net[0][0])
                    if when > self._vnow:
                        self._vnow = when
                        self.jumps += 1
                else:
                    self._poll_fds(DEADLOCK_GRACE)
                    if not ready:
                        raise VirtualTimeDeadlock(
                            "virtual time: nothing is ready and no timer is pending, but the "
                            "run is not done (something awaits a future no one will complete)"
                        )

        now = self._vnow
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            handle._scheduled = False
            ready.append(handle)

        ntodo = len(ready)
        self.events += ntodo
        popleft = ready.popleft
        for _ in range(ntodo):
            handle = popleft()
            if not handle._cancelled:
                handle._run()

        while net and net[0][0] <= now:
            _, _, fn, args = heapq.heappop(net)
            self.events += 1
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported, as asyncio does for a callback
                self.call_exception_handler(
                    {"message": f"exception in network delivery {fn!r}", "exception": exc}
                )

    def _poll_fds(self, timeout: float) -> None:
        self._process_events(self._selector.select(timeout))  # type: ignore[attr-defined]

    def wall_time(self) -> float:
        return time.perf_counter() - self.wall_started


class LoopClock:
    """A ``Clock`` reading the running loop's time (virtual under VirtualTimeLoop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._time = loop.time

    def now(self) -> float:
        return self._time()


def run(main: Callable[[], Any], *, start: float = START) -> Any:
    """``asyncio.run`` on a fresh VirtualTimeLoop: ``main()`` is the coroutine."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main())
