"""Work spread over threads for ``tlvr data fetch``: downloads wait on sockets and hashing on hashlib, both
outside the GIL."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T, R = TypeVar("T"), TypeVar("R")


def in_parallel(fn: Callable[[T], R], items: list[T], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each item, in the order they finish, ``fn`` running on up to ``workers``
    threads (downloads and hashing release the GIL). The first exception is raised here once the items in
    flight have finished, the queued ones dropped; Ctrl-C is raised at once: the threads are daemons, so
    the process exits without waiting for a download in flight (which the next fetch resumes)."""
    queued: queue.SimpleQueue = queue.SimpleQueue()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        queued.put(item)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                item = queued.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((item, fn(item), None))
            except BaseException as exc:  # handed to the caller's thread, KeyboardInterrupt included
                finished.put((item, None, exc))

    threads = [threading.Thread(target=work, daemon=True, name=f"tlvr-fetch-{i}")
               for i in range(max(1, min(workers, len(items))))]
    for thread in threads:
        thread.start()
    try:
        for _ in items:
            while True:
                try:  # a timeout, so that Ctrl-C reaches this thread while it waits
                    item, value, exc = finished.get(timeout=0.2)
                    break
                except queue.Empty:
                    continue
            if exc is not None:
                raise exc
            yield item, value
    except KeyboardInterrupt:
        stop.set()
        raise
    except BaseException:
        stop.set()
        for thread in threads:
            thread.join()
        raise
