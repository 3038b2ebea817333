"""Large arrays kept for reuse across regions: strips and batch buffers outlive the stream that made them.

Every region's :class:`~services.tiling.batches.TileBatchStream` needs the same few arrays (strips of the
region's width, batches of the model's shape), several megabytes each. Allocated afresh per region, each is
faulted in page by page and, once freed, handed back to the system by the allocator — measured on the
16,000 px near-free pipeline as ~20,000 page faults and 0.1-0.3 s of kernel time per image. :data:`ARRAYS`
keeps the memory a finished stream gives back, up to :data:`POOL_BYTES`, for the next stream (the next
region, or a worker's next message) to take.

The pool keeps flat buffers and hands out arrays viewing them, of any shape and dtype that fits: the last
column of regions is narrower than the others, and its strips reuse the wider ones' memory instead of
adding to it (exact shapes only cost ~45 MB of peak RSS on that run). It never raises the peak (a stream
takes from it before allocating), and what it keeps between jobs is bounded by ``POOL_BYTES`` (the least
recently given back dropped first).
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np

#: At most this many bytes of idle buffers are kept (a region's strips and batches at the default settings
#: are ~100 MB with uint8 batches, ~250 MB with float32 ones).
POOL_BYTES = 256 * 1024 * 1024
#: A buffer serves a request at most this many times its size, so small arrays do not pin large buffers.
MAX_WASTE = 1.5


class ArrayPool:
    """Idle flat buffers, handed out as C-contiguous arrays of the shape and dtype asked for; thread-safe.
    :meth:`take` one (contents undefined) or a new one; :meth:`give` it (or any view of it) back when done."""

    def __init__(self, limit_bytes: int = POOL_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._idle: list[np.ndarray] = []  # flat uint8 buffers, least recently given back first
        self._bytes = 0
        # The buffers this pool made, by id (weakly: a buffer nobody holds is simply freed).
        self._made: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers held now."""
        return self._bytes

    def take(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` (its contents undefined): on an idle buffer that fits (the
        smallest), else on a new one."""
        kind = np.dtype(dtype)
        need = math.prod(shape) * kind.itemsize
        with self._lock:
            fits = [b for b in self._idle if need <= b.nbytes <= max(need * MAX_WASTE, need + 4096)]
            if fits:
                buffer = min(fits, key=lambda b: b.nbytes)
                self._idle = [b for b in self._idle if b is not buffer]
                self._bytes -= buffer.nbytes
            else:
                buffer = np.empty(max(need, 1), dtype=np.uint8)
                self._made[id(buffer)] = buffer
        return buffer[:need].view(kind).reshape(shape)

    def give(self, array: np.ndarray) -> None:
        """Keep the buffer under ``array`` (one the pool handed out; nothing may read or write it any more)
        for a later :meth:`take`; the least recently given are dropped past ``limit_bytes``. Arrays the pool
        did not hand out are ignored, and a buffer given back twice is kept once."""
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        if self._made.get(id(root)) is not root or root.nbytes > self.limit_bytes:
            return
        with self._lock:
            for held in self._idle:
                if held is root:  # given back twice: it must not be taken twice
                    return
            self._idle.append(root)
            self._bytes += root.nbytes
            while self._bytes > self.limit_bytes:
                dropped = self._idle.pop(0)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self._lock:
            self._idle.clear()
            self._bytes = 0


#: The process's pool, shared by every stream.
ARRAYS = ArrayPool()
