"""Failed logins, remembered: a client address or a user name with too many recent failures is locked out for a
while, and told for how long. Every way of proving who one is counts (the login form, HTTP Basic, wrong bearer
tokens); its callers decide which failures count against which keys.

A failure counts against a name whether or not that user exists (a lockout that only real names could get would
say which names are real). Checks still in flight count as failures until they settle, so a burst of concurrent
guesses gets no more tries than the same guesses one after another. The tables are bounded: expired entries are
dropped, and a flood of fresh keys evicts the oldest unlocked ones first.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_KEYS = 10_000  # entries per table (addresses, names) at most
LONGEST_KEY = 128  # longer names are kept by their digest: a huge name must not cost huge memory


class LockedOut(Exception):
    """A login refused without checking it: `whom` ("user" or "address") is locked out for `retry_after_s`."""

    def __init__(self, whom: str, retry_after_s: float, in_flight: bool = False):
        self.whom = whom
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.in_flight = in_flight
        holder = "for this user" if whom == "user" else "from this address"
        if in_flight:
            message = f"too many login attempts at once {holder}; try again in {self.retry_after_s} s"
        else:
            message = f"too many failed logins {holder}; try again in {self.retry_after_s} s"
        super().__init__(message)


@dataclass
class _Record:
    failures: collections.deque = field(default_factory=collections.deque)  # monotonic times, oldest first
    in_flight: int = 0  # checks admitted and not yet settled
    locked_until: float = 0.0


class _Table:
    """One kind of key (addresses or names): failures within the window, lockouts, a bounded size."""

    def __init__(self, whom: str, max_failures: int, window_s: float, lockout_s: float, max_keys: int):
        self.whom = whom
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_keys = max_keys
        self._records: collections.OrderedDict[str, _Record] = collections.OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._records)

    def lockout(self, key: str, now: float) -> LockedOut | None:
        record = self._records.get(key)
        if record is None or record.locked_until <= now:
            return None
        return LockedOut(self.whom, record.locked_until - now)

    def refusal(self, key: str, now: float) -> LockedOut | None:
        """Why `key` may not try now: locked out, or as many checks in flight as it has failures left."""
        record = self._records.get(key)
        if record is None:
            return None
        if (lockout := self.lockout(key, now)) is not None:
            return lockout
        self._forget_old(record, now)
        if len(record.failures) + record.in_flight >= self.max_failures:
            return LockedOut(self.whom, 1, in_flight=True)
        return None

    def admit(self, key: str, now: float) -> None:
        self._record(key, now).in_flight += 1

    def release(self, key: str) -> None:
        record = self._records.get(key)
        if record is not None and record.in_flight > 0:
            record.in_flight -= 1

    def fail(self, key: str, now: float, shown: str) -> LockedOut | None:
        """Count a failure; the lockout it starts, if it starts one (`shown` is the key as the log names it)."""
        record = self._record(key, now)
        if record.locked_until > now:  # already locked: a further try neither counts nor extends the lockout
            return LockedOut(self.whom, record.locked_until - now)
        self._forget_old(record, now)
        record.failures.append(now)
        if len(record.failures) < self.max_failures:
            return None
        record.failures.clear()  # after the lockout, a fresh allowance
        record.locked_until = now + self.lockout_s
        log.warning("login: %s %s locked out for %g s after %d failed logins within %g s", self.whom, shown,
                    self.lockout_s, self.max_failures, self.window_s)
        return LockedOut(self.whom, self.lockout_s)

    def reset(self, key: str) -> None:
        """Forget `key`'s failures (not its lockout, nor its checks in flight)."""
        record = self._records.get(key)
        if record is not None:
            record.failures.clear()

    def _forget_old(self, record: _Record, now: float) -> None:
        while record.failures and record.failures[0] <= now - self.window_s:
            record.failures.popleft()

    def _record(self, key: str, now: float) -> _Record:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_keys:
                self._make_room(now)
            record = self._records[key] = _Record()
        self._records.move_to_end(key)
        return record

    def _make_room(self, now: float) -> None:
        """Drop what is over; if a flood of live keys fills the table, drop a tenth of it: unlocked keys with the
        fewest failures first (dropping a lockout would let a flood of fresh names lift it)."""
        for key, record in list(self._records.items()):
            self._forget_old(record, now)
            if not record.failures and not record.in_flight and record.locked_until <= now:
                del self._records[key]
        target = self.max_keys - max(1, self.max_keys // 10)
        # Fewest failures first (least recently used among equals): a flood of one-try names must not wipe the
        # count of a name someone has been guessing at.
        by_failures = sorted(self._records.items(), key=lambda item: len(item[1].failures))
        for unlocked_only in (True, False):
            for key, record in by_failures:
                if key not in self._records:
                    continue
                if len(self._records) <= target:
                    return
                if record.in_flight or (unlocked_only and record.locked_until > now):
                    continue
                del self._records[key]


def _name_key(name: str) -> str:
    if len(name) <= LONGEST_KEY:
        return name
    return "sha256:" + hashlib.sha256(name.encode(errors="surrogatepass")).hexdigest()


def _shown(name: str) -> str:
    """A name as the log shows it: quoted (no line breaks from a hostile name) and short."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


class Attempt:
    """A login check in flight: set `ok` when it is known; unset when the check itself failed to run."""

    ok: bool | None = None


class LoginThrottle:
    """Failed logins per client address and per user name (thread-safe: the login form's handler runs in a thread
    pool, the access middleware on the event loop)."""

    def __init__(self, max_failures: int = 5, address_max_failures: int = 20, window_s: float = 600,
                 lockout_s: float = 300, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic):
        self._names = _Table("user", max_failures, window_s, lockout_s, max_keys)
        self._addresses = _Table("address", address_max_failures, window_s, lockout_s, max_keys)
        self._clock = clock
        self._lock = threading.Lock()

    def sizes(self) -> tuple[int, int]:
        """(addresses, names) remembered now."""
        with self._lock:
            return len(self._addresses), len(self._names)

    def check(self, address: str, name: str | None = None) -> None:
        """Raise LockedOut while the address or the name is locked out."""
        with self._lock:
            now = self._clock()
            lockout = self._addresses.lockout(address, now)
            if lockout is None and name is not None:
                lockout = self._names.lockout(_name_key(name), now)
        if lockout is not None:
            raise lockout

    @contextlib.contextmanager
    def attempt(self, address: str, name: str | None = None) -> Iterator[Attempt]:
        """Around one slow check (a password's scrypt): raises LockedOut before it while the address or name is
        locked out (or has as many checks in flight as failures left); after it, a failure (`ok` False) counts
        against both and raises LockedOut if it locks one out."""
        key = None if name is None else _name_key(name)
        with self._lock:
            now = self._clock()
            refusal = self._addresses.refusal(address, now)
            if refusal is None and key is not None:
                refusal = self._names.refusal(key, now)
            if refusal is not None:
                raise refusal
            self._addresses.admit(address, now)
            if key is not None:
                self._names.admit(key, now)
        attempt = Attempt()
        try:
            yield attempt
        finally:
            with self._lock:
                self._addresses.release(address)
                if key is not None:
                    self._names.release(key)
                lockout = self._settle(address, name, key, attempt.ok)
        if lockout is not None:
            raise lockout

    def forgive(self, name: str) -> None:
        """Forget the name's failures, after its owner proved it. Not the address's: an attacker with an account
        of their own must not clear their address's count by logging into it between guesses at other names."""
        with self._lock:
            self._names.reset(_name_key(name))

    def failed(self, address: str) -> None:
        """A failure known at once (a wrong bearer token: it names no user): raises LockedOut if the address is
        or now becomes locked out."""
        with self._lock:
            lockout = self._addresses.fail(address, self._clock(), address)
        if lockout is not None:
            raise lockout

    def _settle(self, address: str, name: str | None, key: str | None, ok: bool | None) -> LockedOut | None:
        if ok is not False:  # passed (forgiving is the caller's call), or never ran to an answer: nothing counted
            return None
        now = self._clock()
        by_address = self._addresses.fail(address, now, address)
        by_name = None if key is None else self._names.fail(key, now, _shown(name))
        lockouts = [lockout for lockout in (by_address, by_name) if lockout is not None]
        return max(lockouts, key=lambda lockout: lockout.retry_after_s, default=None)
