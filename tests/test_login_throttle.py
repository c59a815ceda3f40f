"""Guessing logins: wrong passwords (login form, HTTP Basic on /sdapi) and wrong bearer tokens lock out the name and
the client address for a while, with 429 and Retry-After; tokens and sessions already held keep working; an
unknown name costs as much as a known one. Over HTTP against a served studio (each test speaks from loopback
addresses of its own, so their failures don't add up), and the throttle's bookkeeping on a fake clock."""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import random
import statistics
import time

import httpx
import pytest

from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from diffusion_studio.service.throttle import LockedOut, LoginThrottle
from servers import make_users, serving

PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password", "dave": "dave-password",
             "erin": "erin-password", **{f"timer{i}": f"timer{i}-password" for i in range(10)}}
NAME_FAILURES = 3
ADDRESS_FAILURES = 8
LOCKOUT_S = 3  # long enough to look around during a lockout, short enough to wait out


@pytest.fixture(scope="module")
def studio(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("throttle")
    _, tokens = make_users(root / "users.json", PASSWORDS)
    config = StudioConfig(data_dir=data_dir, models_dir=root / "models", auth="on", users_file=root / "users.json",
                          login_max_failures=NAME_FAILURES, login_address_max_failures=ADDRESS_FAILURES,
                          login_window_s=600, login_lockout_s=LOCKOUT_S)
    with serving(build_app(config)) as url:
        yield url, tokens


def client_from(url: str, address: str) -> httpx.Client:
    """A client whose connections come from `address` (any of 127.0.0.0/8 reaches the server on 127.0.0.1)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30)


def login(client: httpx.Client, name: str, password: str) -> httpx.Response:
    return client.post("/login", data={"username": name, "password": password, "next": "/"})


def basic(name: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_locked_out(reply: httpx.Response, whom: str) -> int:
    """A lockout refusal: 429, Retry-After within the lockout, and words saying who is locked out for how long."""
    assert reply.status_code == 429, (reply.status_code, reply.text[:300])
    retry_after = int(reply.headers["retry-after"])
    assert 1 <= retry_after <= LOCKOUT_S
    holder = "for this user" if whom == "user" else "from this address"
    assert f"too many failed logins {holder}; try again in {retry_after} s" in reply.text.lower()
    return retry_after


def test_wrong_passwords_lock_the_name_out_until_the_lockout_ends(studio, caplog):
    url, tokens = studio
    with client_from(url, "127.0.0.11") as browser, client_from(url, "127.0.0.12") as attacker, \
            client_from(url, "127.0.0.13") as elsewhere:
        assert login(browser, "alice", PASSWORDS["alice"]).status_code == 303  # a session from before
        for _ in range(NAME_FAILURES - 1):
            wrong = login(attacker, "alice", "guess-password")
            assert wrong.status_code == 401 and "Wrong user or password" in wrong.text
        with caplog.at_level(logging.WARNING, logger="diffusion_studio.service.throttle"):
            assert_locked_out(login(attacker, "alice", "guess-password"), "user")
        [warning] = [r.getMessage() for r in caplog.records if "locked out" in r.getMessage()]
        assert "'alice'" in warning and "guess-password" not in warning

        refused = login(elsewhere, "alice", PASSWORDS["alice"])  # the right password, from any address
        retry_after = assert_locked_out(refused, "user")
        assert "ds_session" not in refused.cookies and "<form" in refused.text  # the login page, saying why
        assert elsewhere.get("/api/v1/history", headers=bearer(tokens["alice"])).status_code == 200
        assert browser.get("/api/v1/history").status_code == 200  # the session held before the lockout
        assert login(elsewhere, "bob", PASSWORDS["bob"]).status_code == 303  # other names are not locked

        time.sleep(retry_after + 0.2)
        again = login(elsewhere, "alice", PASSWORDS["alice"])
        assert again.status_code == 303 and "ds_session" in again.cookies


def test_failures_across_many_names_lock_the_address_out(studio):
    url, tokens = studio
    with client_from(url, "127.0.0.21") as guesser, client_from(url, "127.0.0.22") as neighbour:
        for i in range(ADDRESS_FAILURES - 1):
            assert login(guesser, f"nobody{i}", "guess-password").status_code == 401
        assert_locked_out(login(guesser, "nobody-last", "guess-password"), "address")
        assert_locked_out(login(guesser, "bob", PASSWORDS["bob"]), "address")  # right passwords too
        assert guesser.get("/api/v1/history", headers=bearer(tokens["bob"])).status_code == 200  # tokens pass
        assert login(neighbour, "bob", PASSWORDS["bob"]).status_code == 303  # only that address is locked


def test_basic_on_sdapi_is_throttled_and_its_memory_is_no_way_around(studio):
    url, tokens = studio
    options = "/sdapi/v1/options"
    with client_from(url, "127.0.0.31") as client, client_from(url, "127.0.0.32") as owner:
        assert owner.get(options, headers=basic("carol", PASSWORDS["carol"])).status_code == 200  # now remembered
        for _ in range(NAME_FAILURES - 1):
            wrong = client.get(options, headers=basic("carol", "guess-password"))
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Basic ")
        assert_locked_out(client.get(options, headers=basic("carol", "guess-password")), "user")
        assert_locked_out(owner.get(options, headers=basic("carol", PASSWORDS["carol"])), "user")  # remembered
        assert_locked_out(login(owner, "carol", PASSWORDS["carol"]), "user")  # the form shares the count
        assert owner.get(options, headers=basic("carol", tokens["carol"])).status_code == 200  # a token as secret
        assert owner.get(options, headers=bearer(tokens["carol"])).status_code == 200


def test_wrong_bearer_tokens_lock_the_address_out(studio):
    url, tokens = studio
    with client_from(url, "127.0.0.41") as client:
        for _ in range(3 * ADDRESS_FAILURES):  # public routes answer the same to anyone: nothing to guess there
            assert client.get("/health", headers=bearer("ds_guess")).status_code == 200
        for i in range(ADDRESS_FAILURES - 1):
            wrong = client.get("/api/v1/history", headers=bearer(f"ds_guess{i}"))
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert_locked_out(client.get("/api/v1/history", headers=bearer("ds_guess-last")), "address")
        assert_locked_out(client.get("/api/v1/queue", headers=bearer("ds_guess-again")), "address")
        assert client.get("/api/v1/history", headers=bearer(tokens["dave"])).status_code == 200  # 256 bits: pass
        assert_locked_out(login(client, "dave", PASSWORDS["dave"]), "address")


def test_concurrent_guesses_get_no_more_tries_than_sequential_ones(studio):
    url, _ = studio
    with client_from(url, "127.0.0.51") as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda i: login(client, "erin", f"guess-{i}"), range(12)))
    codes = [reply.status_code for reply in replies]
    assert set(codes) <= {401, 429} and codes.count(401) <= NAME_FAILURES - 1, codes


def test_an_unknown_name_takes_as_long_as_a_known_one(studio):
    """Median time of a wrong login for existing names against unknown ones, interleaved; each pair from an
    address of its own and each name tried once, so no lockout answers early."""
    url, _ = studio
    known, unknown = [], []
    for i in range(10):
        with client_from(url, f"127.0.2.{i + 1}") as client:
            login(client, f"warm-up{i}", "guess-password")  # the connection, not the check, on the clock below
            for name, times in random.sample([(f"timer{i}", known), (f"ghost{i}", unknown)], 2):
                started = time.perf_counter()
                assert login(client, name, "guess-password").status_code == 401
                times.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 <= ratio <= 2, (ratio, known, unknown)


# -- the throttle's bookkeeping, on a clock of our own ------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(throttle: LoginThrottle, address: str, name: str | None) -> LockedOut | None:
    try:
        with throttle.attempt(address, name) as attempt:
            attempt.ok = False
    except LockedOut as lockout:
        return lockout
    return None


def test_failures_age_out_of_the_window_and_forgiving_spares_the_address():
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, address_max_failures=5, window_s=60, lockout_s=30, clock=clock)
    assert fail(throttle, "a", "alice") is None and fail(throttle, "a", "alice") is None
    clock.now += 61  # both out of the window
    assert fail(throttle, "a", "alice") is None and fail(throttle, "a", "alice") is None
    throttle.forgive("alice")  # alice logged in: her name starts afresh, the address does not
    assert fail(throttle, "a", "alice") is None and fail(throttle, "a", "alice") is None
    lockout = fail(throttle, "a", "alice")  # the address's fifth within the window
    assert lockout is not None and lockout.whom == "address" and lockout.retry_after_s == 30
    clock.now += 29.5
    with pytest.raises(LockedOut, match="try again in 1 s"):
        throttle.check("a", "someone-else")
    clock.now += 0.5
    throttle.check("a", "alice")  # over: nothing raised


def test_checks_in_flight_count_until_they_settle():
    throttle = LoginThrottle(max_failures=2, address_max_failures=100, window_s=60, lockout_s=30, clock=Clock())
    with throttle.attempt("a", "bob"), throttle.attempt("b", "bob"):
        with pytest.raises(LockedOut) as refused, throttle.attempt("c", "bob"):
            pass
        assert refused.value.in_flight and "at once" in str(refused.value)
    # both left without an answer (the check itself broke): nothing counted
    with throttle.attempt("a", "bob") as attempt:
        attempt.ok = True
    assert fail(throttle, "a", "bob") is None


def test_the_tables_stay_bounded_under_a_flood_and_keep_their_lockouts():
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, address_max_failures=2, window_s=60, lockout_s=600, max_keys=500,
                             clock=clock)
    fail(throttle, "target-address", "target")
    assert fail(throttle, "target-address", "target") is not None  # locked out: both
    for i in range(20_000):
        fail(throttle, f"10.0.{i // 256}.{i % 256}", f"random-{i}")
        assert max(throttle.sizes()) <= 500
    with pytest.raises(LockedOut):
        throttle.check("elsewhere", "target")  # the flood did not lift the name's lockout
    with pytest.raises(LockedOut):
        throttle.check("target-address")
    clock.now += 601  # everything expired: once the tables fill up again, all of it goes at once
    for i in range(60):
        fail(throttle, f"late-{i}", f"late-name-{i}")
    assert throttle.sizes() == (60, 60)


def test_a_huge_name_is_kept_small():
    throttle = LoginThrottle(max_failures=2, clock=Clock())
    name = "x" * 100_000
    fail(throttle, "a", name)
    assert fail(throttle, "b", name) is not None  # still counted as one name
    assert all(len(key) < 200 for key in throttle._names._records)


def test_a_flood_of_one_try_names_does_not_wipe_a_guessed_names_count():
    clock = Clock()
    throttle = LoginThrottle(max_failures=5, address_max_failures=10_000, window_s=600, lockout_s=600, max_keys=500,
                             clock=clock)
    for _ in range(4):  # one try short of the lockout
        assert fail(throttle, "a", "alice") is None
    for i in range(5_000):
        fail(throttle, f"10.1.{i // 256}.{i % 256}", f"junk-{i}")
    assert fail(throttle, "b", "alice") is not None  # the fifth still locks her name out


def test_an_ipv6_client_counts_as_its_whole_64():
    from diffusion_studio.api.access import client_address

    def address(peer):
        return client_address({"client": (peer, 40000)})

    assert address("2001:db8:1:2::1") == address("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert address("2001:db8:1:3::1") != address("2001:db8:1:2::1")
    assert address("::ffff:192.0.2.7") == address("192.0.2.7") == "192.0.2.7"
