"""Large arrays kept for reuse across regions: strips and batch buffers outlive the stream that made them.

Every region's :class:`~services.tiling.batches.TileBatchStream` needs the same few arrays (strips of the
region's width, batches of the model's shape), several megabytes each. Allocated afresh per region, each is
faulted in page by page and, once freed, handed back to the system by the allocator — measured on the
16,000 px near-free pipeline as ~20,000 page faults and 0.1-0.3 s of kernel time per image. :data:`ARRAYS`
keeps the arrays a finished stream gives back, up to :data:`POOL_BYTES`, for the next stream (the next
region, or a worker's next message) to take.

The pool only holds arrays nobody uses: it never raises the peak (a stream takes from it before allocating),
and what it keeps between jobs is bounded by ``POOL_BYTES`` (least recently given back dropped first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

#: At most this many bytes of idle arrays are kept (a region's strips and batches at the default settings
#: are ~100 MB with uint8 batches, ~250 MB with float32 ones).
POOL_BYTES = 256 * 1024 * 1024

Key = tuple[tuple[int, ...], str]


class ArrayPool:
    """Idle C-contiguous arrays by shape and dtype; thread-safe. :meth:`take` one (contents undefined) or
    a new one; :meth:`give` it back when done."""

    def __init__(self, limit_bytes: int = POOL_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._idle: OrderedDict[Key, list[np.ndarray]] = OrderedDict()
        self._bytes = 0

    @property
    def idle_bytes(self) -> int:
        """Bytes of the arrays held now."""
        return self._bytes

    def take(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """An idle array of ``shape`` and ``dtype`` (its contents undefined), else a new one."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            arrays = self._idle.get(key)
            if arrays:
                array = arrays.pop()
                self._bytes -= array.nbytes
                if not arrays:
                    del self._idle[key]
                return array
        return np.empty(shape, dtype=dtype)

    def give(self, array: np.ndarray) -> None:
        """Keep ``array`` for a later :meth:`take` (one nothing reads or writes any more); the least recently
        given arrays are dropped when more than ``limit_bytes`` would be held."""
        if array.base is not None or not array.flags.c_contiguous or array.nbytes > self.limit_bytes:
            return
        key = (array.shape, array.dtype.str)
        with self._lock:
            arrays = self._idle.setdefault(key, [])
            for held in arrays:
                if held is array:  # given back twice: it must not be taken twice
                    return
            arrays.append(array)
            self._idle.move_to_end(key)
            self._bytes += array.nbytes
            while self._bytes > self.limit_bytes:
                oldest, arrays = next(iter(self._idle.items()))
                dropped = arrays.pop(0)
                self._bytes -= dropped.nbytes
                if not arrays:
                    del self._idle[oldest]

    def clear(self) -> None:
        """Drop every idle array."""
        with self._lock:
            self._idle.clear()
            self._bytes = 0


#: The process's pool, shared by every stream.
ARRAYS = ArrayPool()
