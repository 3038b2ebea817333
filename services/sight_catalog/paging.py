"""The warehouse's listings, a page at a time in a stable order (by id), continued with
:attr:`Page.next_after`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.errors import UserError

T = TypeVar("T")

#: Largest page a listing returns.
MAX_PAGE = 1000


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_after`` (None: the last page) is the ``after`` of the next one."""

    items: list[T]
    next_after: int | None


def page_size(limit: int) -> int:
    """``limit`` when a page may hold that many items; UserError otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise UserError(f"a page holds 1 to {MAX_PAGE} items, not {limit!r}")
    return limit


def page_of(rows: list[Any], limit: int, key: Any = None) -> Page[Any]:
    """The page of ``rows`` (``limit`` + 1 fetched: one more says there is a next page), continued after the
    last item's ``key`` (its id by default)."""
    if len(rows) <= limit:
        return Page(rows, None)
    items = rows[:limit]
    last = items[-1]
    return Page(items, int(key(last) if key else last.id))
