"""Who calls the catalog API, and how often: the bearer token checked in constant time (:data:`Reader`,
:data:`Writer`), and token buckets per caller (:class:`RateLimiter`, :func:`spend`)."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.errors import UserError
from services.sight_catalog.problems import Problem
from services.sight_catalog.tokens import TOKEN_ENV

if TYPE_CHECKING:
    from services.sight_catalog.api import Settings


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``burst`` requests at once, refilled at ``per_second``."""

    burst: int
    per_second: float

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise UserError(f"a rate limit allows a burst of at least 1 request, not {self.burst!r}")
        if not self.per_second > 0:
            raise UserError(f"a rate limit refills at more than 0 requests a second, not {self.per_second!r}")


class RateLimiter:
    """Token buckets by caller: :meth:`take` spends one request, or says how long to wait. At most
    ``max_callers`` buckets are kept (the least recently used go first: a new bucket is full anyway)."""

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000):
        self.rate = rate
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when ``caller`` may go ahead (one request spent), else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(caller, (float(self.rate.burst), now))
            tokens = min(float(self.rate.burst), tokens + (now - last) * self.rate.per_second)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate.per_second
            self._buckets[caller] = (tokens, now)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
            return wait


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``authenticated`` with the token or not, and the key their rate limits go by."""

    authenticated: bool
    key: str


_bearer = HTTPBearer(auto_error=False, description="the catalog's token (TESSERA_CATALOG_TOKEN)")


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None, needed: bool) -> Caller:
    """Who calls (see :class:`Caller`); 401 when ``needed`` and the token is missing or wrong."""
    expected: bytes = request.app.state.token
    address = request.client.host if request.client else "unknown"
    given = credentials.credentials.encode("utf-8", "replace") if credentials else b""
    authenticated = bool(expected) and hmac.compare_digest(given, expected)
    if needed and expected and not authenticated:
        why = "wrong token" if credentials else "no token"
        raise Problem(
            "unauthorized",
            f"{why}: this needs 'Authorization: Bearer <token>' with the catalog's token ({TOKEN_ENV})",
            headers={
                "WWW-Authenticate": 'Bearer realm="tessera-sights"'
                + (', error="invalid_token"' if credentials else "")
            },
        )
    fingerprint = hashlib.sha256(given).hexdigest()[:12] if authenticated else "anonymous"
    return Caller(authenticated, f"{fingerprint}@{address}")


def _reader(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """A reader: needs the token when the server is bound beyond loopback."""
    settings: Settings = request.app.state.settings
    return _caller(request, credentials, settings.reads_need_token)


def _writer(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """A writer (or a recognition): needs the token whenever the server has one."""
    return _caller(request, credentials, True)


Reader = Annotated[Caller, Depends(_reader)]
Writer = Annotated[Caller, Depends(_writer)]


def spend(limiter: RateLimiter, who: Caller, what: str) -> None:
    """Spend one of ``who``'s ``what`` (uploads, recognitions) from ``limiter``; 429 when none is left."""
    wait = limiter.take(who.key)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise Problem(
            "rate-limited",
            f"too many {what} from this client: {limiter.rate.burst} at once, then "
            f"{limiter.rate.per_second:g} a second; try again in {seconds} s",
            headers={"Retry-After": str(seconds)},
            retry_after_s=seconds,
        )
