"""Load the next batch's images while the current batch is on the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["prefetched"]

B = TypeVar("B")
R = TypeVar("R")


def prefetched(batches: Iterable[B], load: Callable[[B], R]) -> Iterator[tuple[B, R]]:
    """Yield ``(batch, load(batch))`` in order, with ``load`` of the next batch running in
    one background thread while the caller works on the current one.

    Image decoding releases the GIL, so a folder of JPEGs decodes while the GPU runs the
    previous batch. At most two batches are loaded at a time. ``load`` sees the batches in
    order; an exception it raises reaches the caller at that batch, after every earlier
    batch was yielded, as a plain loop would. Leaving the loop early waits for the one
    pending load.
    """
    batches = list(batches)
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmfix-prefetch") as pool:
        future = pool.submit(load, batches[0])
        for i, batch in enumerate(batches):
            result = future.result()
            if i + 1 < len(batches):
                future = pool.submit(load, batches[i + 1])
            yield batch, result
