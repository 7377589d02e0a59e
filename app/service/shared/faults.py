"""Redis's errors as the shared store reads them, and an outage of Redis as each of its loops logs it."""

from __future__ import annotations

import logging
import time

try:
    from redis.exceptions import AuthenticationError as RedisAuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # the [redis] extra is not installed: the in-memory store needs none of this
    class RedisError(Exception):  # type: ignore[no-redef]
        pass

    RedisAuthenticationError = RedisConnectionError = RedisTimeoutError = RedisError  # type: ignore[misc]


def unreachable(exc: BaseException) -> bool:
    """Whether a Redis error says it cannot be reached (yet): worth retrying, unlike a wrong password (redis-py's
    AuthenticationError is a ConnectionError) or a server that refuses a command."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) and not isinstance(exc, RedisAuthenticationError)


log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class Outage:
    """A loop's spells of Redis being unreachable, logged when they begin and when they end: not a traceback a second
    through an outage. Another error is logged with its traceback each time, and is no outage."""

    def __init__(self, loop: str):
        self.loop = loop
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if not unreachable(exc):
            log.error("%s failed; retrying", self.loop, exc_info=exc)
        elif self.since is None:
            log.warning("%s: Redis cannot be reached (%s); retrying every second", self.loop, exc)
            self.since = time.monotonic()

    def ended(self) -> bool:
        """Whether this ends an outage."""
        if self.since is None:
            return False
        log.warning("%s: Redis answers again after %.0f s", self.loop, time.monotonic() - self.since)
        self.since = None
        return True

