"""WeChatGateway against the WeChat stand-in, the access token shared through Redis, and the stand-in's wire format."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import requests
from wechatpy.client import WeChatClient
from wechatpy.client.api.wxa import WeChatWxa

from backend.errors import RateLimited, ServiceUnavailable, Unauthorized
from backend.settings import Settings
from backend.wechat import (
    ACCESS_TOKEN_REFRESH_MARGIN_S,
    WeChatCodeInvalid,
    WeChatGateway,
    WeChatRateLimited,
    WeChatSendError,
    WeChatSendRejected,
    WeChatSendRetryable,
    WeChatSession,
    WeChatUnavailable,
    WeChatUserNotSubscribed,
)
from scripts.wechat_standin import WeChatStandinServer, derive_openid, make_server

APPID = "wx-standin-test"
SECRET = "standin-test-secret-7f3a"
HTTP_TIMEOUT_S = 5.0


def _start(server: WeChatStandinServer) -> tuple[str, threading.Thread]:
    thread = threading.Thread(target=server.serve_forever, name="wechat-standin", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/", thread


def _stop(server: WeChatStandinServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def standin() -> Iterator[str]:
    """Base URL of a stand-in that checks APPID and SECRET."""
    server = make_server("127.0.0.1", 0, appid=APPID, secret=SECRET)
    base_url, thread = _start(server)
    yield base_url
    _stop(server, thread)


@pytest.fixture(scope="module")
def open_standin() -> Iterator[str]:
    """Base URL of a stand-in started without an appid or secret, which accepts any."""
    server = make_server("127.0.0.1", 0)
    base_url, thread = _start(server)
    yield base_url
    _stop(server, thread)


@pytest.fixture(autouse=True)
def reset_standin(standin: str) -> None:
    response = requests.post(f"{standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 204


def _settings(base_url: str, **overrides) -> Settings:
    values = {
        "wechat_appid": APPID,
        "wechat_secret": SECRET,
        "wechat_api_base_url": base_url,
        "wechat_timeout_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def gateway(standin: str) -> Iterator[WeChatGateway]:
    gateway = WeChatGateway(_settings(standin))
    yield gateway
    gateway.close()


def _calls(base_url: str) -> list[dict]:
    response = requests.get(f"{base_url}__standin__/calls", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return response.json()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Base URL of a socket that completes TCP handshakes but never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """Base URL of a server that sends one header byte every 0.1 s and never ends the response.

    Each byte restarts requests' read timeout, so only the gateway's overall deadline stops the call.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle(connection: socket.socket) -> None:
        with connection:
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nX-Padding: ")
                while not stop.wait(0.1):
                    connection.sendall(b"a")
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    stop.set()
    listener.close()


# WeChatGateway


async def test_login_returns_session(gateway: WeChatGateway) -> None:
    session = await gateway.code_to_session("resident-login.1")

    assert isinstance(session, WeChatSession)
    assert session.openid == derive_openid(APPID, "resident-login")
    assert session.openid.startswith("o")
    assert len(session.openid) == 28
    assert session.session_key
    assert session.unionid is None


async def test_login_same_prefix_same_openid(gateway: WeChatGateway) -> None:
    first = await gateway.code_to_session("resident-a.1")
    second = await gateway.code_to_session("resident-a.2")
    other = await gateway.code_to_session("resident-b.1")

    assert first.openid == second.openid
    assert other.openid != first.openid
    # The stand-in issues a new session_key with every login.
    assert first.session_key != second.session_key


async def test_session_key_hidden_from_repr(gateway: WeChatGateway) -> None:
    session = await gateway.code_to_session("resident-repr.1")

    assert session.session_key not in repr(session)
    assert session.openid in repr(session)


@pytest.mark.parametrize("code", ["invalid-demo", "has space", "non-ascii-码", "x" * 129])
async def test_invalid_code_rejected(gateway: WeChatGateway, code: str) -> None:
    with pytest.raises(WeChatCodeInvalid) as caught:
        await gateway.code_to_session(code)

    assert isinstance(caught.value, Unauthorized)
    assert caught.value.status == 401
    assert caught.value.code == "wechat_code_invalid"


async def test_invalid_code_errcode_is_40029(gateway: WeChatGateway, standin: str) -> None:
    with pytest.raises(WeChatCodeInvalid):
        await gateway.code_to_session("invalid-errcode")

    login_calls = [call for call in _calls(standin) if call["path"] == "/sns/jscode2session"]
    assert [call["errcode"] for call in login_calls] == [40029]


async def test_empty_code_rejected_without_call(gateway: WeChatGateway, standin: str) -> None:
    with pytest.raises(WeChatCodeInvalid):
        await gateway.code_to_session("")

    assert _calls(standin) == []


async def test_reused_code_rejected(gateway: WeChatGateway, standin: str) -> None:
    await gateway.code_to_session("resident-reuse.1")

    with pytest.raises(WeChatCodeInvalid) as caught:
        await gateway.code_to_session("resident-reuse.1")

    assert caught.value.code == "wechat_code_invalid"
    login_calls = [call for call in _calls(standin) if call["path"] == "/sns/jscode2session"]
    assert [call["errcode"] for call in login_calls] == [0, 40163]


async def test_system_busy_unavailable(gateway: WeChatGateway) -> None:
    with pytest.raises(WeChatUnavailable) as caught:
        await gateway.code_to_session("busy-1")

    assert isinstance(caught.value, ServiceUnavailable)
    assert caught.value.status == 503
    assert caught.value.code == "wechat_unavailable"


async def test_minute_quota_rate_limited(gateway: WeChatGateway) -> None:
    with pytest.raises(WeChatRateLimited) as caught:
        await gateway.code_to_session("ratelimit-1")

    assert isinstance(caught.value, RateLimited)
    assert caught.value.status == 429
    assert caught.value.code == "wechat_rate_limited"


async def test_slow_code_times_out(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin, wechat_timeout_s=0.5))

    started = time.monotonic()
    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("slow-timeout.1")
    elapsed = time.monotonic() - started
    gateway.close()

    assert elapsed >= 0.4
    assert elapsed < 2.0


async def test_slow_call_leaves_event_loop_running(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin, wechat_timeout_s=0.5))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(WeChatUnavailable):
            await gateway.code_to_session("slow-ticker.1")
    finally:
        ticker.cancel()
        gateway.close()

    # A blocked loop would tick at most once in the 0.5 s read timeout, a free one about 25 times.
    assert ticks >= 10


async def test_token_fetch_times_out(silent_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    gateway = WeChatGateway(_settings(silent_server, wechat_timeout_s=0.5))

    started = time.monotonic()
    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-silent.1")
    elapsed = time.monotonic() - started
    gateway.close()

    # requests' own read timeout ends the token fetch, before the overall deadline of 1.5 s.
    assert "ReadTimeout" in caplog.text
    assert elapsed < 1.4


async def test_overall_deadline_stops_trickle(trickling_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    gateway = WeChatGateway(_settings(trickling_server, wechat_timeout_s=0.5))

    started = time.monotonic()
    with pytest.raises(WeChatUnavailable):
        # The outer bound makes a missing deadline fail the test instead of hanging it.
        await asyncio.wait_for(gateway.code_to_session("resident-trickle.1"), timeout=5)
    elapsed = time.monotonic() - started
    gateway.close()

    assert "timed out after 1.5 s" in caplog.text
    assert elapsed >= 1.4
    assert elapsed < 2.5


async def test_token_fetched_from_standin(gateway: WeChatGateway, standin: str) -> None:
    await gateway.code_to_session("resident-token.1")

    calls = _calls(standin)
    assert [call["path"] for call in calls] == ["/cgi-bin/token", "/sns/jscode2session"]
    token_call, login_call = calls
    assert token_call["errcode"] == 0
    assert token_call["params"]["appid"] == APPID
    assert token_call["params"]["grant_type"] == "client_credential"
    assert login_call["params"]["grant_type"] == "authorization_code"
    # wechatpy adds the cached access token to code2Session.
    assert "access_token" in login_call["params"]


async def test_token_reused_across_logins(gateway: WeChatGateway, standin: str) -> None:
    await gateway.code_to_session("resident-cache.1")
    await gateway.code_to_session("resident-cache.2")

    paths = [call["path"] for call in _calls(standin)]
    assert paths.count("/cgi-bin/token") == 1
    assert paths.count("/sns/jscode2session") == 2


async def test_rejected_token_refetched_once(gateway: WeChatGateway, standin: str) -> None:
    await gateway.code_to_session("resident-refetch.1")
    # The reset clears the token that the gateway has cached.
    requests.post(f"{standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)

    session = await gateway.code_to_session("resident-refetch.2")

    assert session.openid == derive_openid(APPID, "resident-refetch")
    calls = [(call["path"], call["errcode"]) for call in _calls(standin)]
    assert calls == [
        ("/sns/jscode2session", 40001),
        ("/cgi-bin/token", 0),
        ("/sns/jscode2session", 0),
    ]


async def test_wrong_secret_unavailable(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin, wechat_secret="wrong-secret"))

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-secret.1")
    gateway.close()

    calls = [(call["path"], call["errcode"]) for call in _calls(standin)]
    assert calls == [("/cgi-bin/token", 40125)]


async def test_wrong_appid_unavailable(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin, wechat_appid="wx-wrong-appid"))

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-appid.1")
    gateway.close()

    calls = [(call["path"], call["errcode"]) for call in _calls(standin)]
    assert calls == [("/cgi-bin/token", 40013)]


async def test_connection_refused_unavailable() -> None:
    gateway = WeChatGateway(_settings(f"http://127.0.0.1:{_free_port()}/"))

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-refused.1")
    gateway.close()


async def test_http_error_unavailable(standin: str) -> None:
    # Every path under this prefix is unknown to the stand-in, so the token fetch gets a 404.
    gateway = WeChatGateway(_settings(f"{standin}missing/"))

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-404.1")
    gateway.close()


async def test_failure_log_omits_secrets(gateway: WeChatGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    caplog.set_level(logging.INFO, logger="wechat_standin")
    caplog.set_level(logging.INFO, logger="wechatpy")

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("busy-logged.1")

    failures = [record for record in caplog.records if record.name == "backend.wechat"]
    assert len(failures) == 1
    assert "errcode=-1" in failures[0].getMessage()
    assert f"appid={APPID}" in failures[0].getMessage()
    assert "busy-logged" not in caplog.text
    assert SECRET not in caplog.text


async def test_network_failure_log_omits_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    gateway = WeChatGateway(_settings(f"http://127.0.0.1:{_free_port()}/"))

    with pytest.raises(WeChatUnavailable) as caught:
        await gateway.code_to_session("resident-netlog.1")
    gateway.close()

    assert "ConnectionError" in caplog.text
    assert f"appid={APPID}" in caplog.text
    assert SECRET not in caplog.text
    assert "resident-netlog" not in caplog.text
    # The requests exception, whose message contains the URL, is not chained.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


async def test_gateway_leaves_wechatpy_defaults(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin))
    gateway.close()

    assert WeChatClient.API_BASE_URL == "https://api.weixin.qq.com/cgi-bin/"
    assert WeChatWxa.API_BASE_URL == "https://api.weixin.qq.com/"
    plain_client = WeChatClient("wx-other", "other-secret")
    assert plain_client.API_BASE_URL == "https://api.weixin.qq.com/cgi-bin/"
    assert plain_client.wxa.API_BASE_URL == "https://api.weixin.qq.com/"


# Stand-in wire format


def _get(base_url: str, path: str, **params: str) -> requests.Response:
    return requests.get(f"{base_url}{path}", params=params, timeout=HTTP_TIMEOUT_S)


def _fetch_token(base_url: str) -> str:
    response = _get(base_url, "cgi-bin/token", grant_type="client_credential", appid=APPID, secret=SECRET)
    return response.json()["access_token"]


def _login(base_url: str, code: str, **overrides: str) -> requests.Response:
    params = {"appid": APPID, "secret": SECRET, "js_code": code, "grant_type": "authorization_code"}
    params.update(overrides)
    return _get(base_url, "sns/jscode2session", **params)


def test_standin_token_success(standin: str) -> None:
    response = _get(standin, "cgi-bin/token", grant_type="client_credential", appid=APPID, secret=SECRET)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"access_token", "expires_in"}
    assert body["access_token"]
    assert body["expires_in"] == 7200


@pytest.mark.parametrize(
    ("params", "errcode", "errmsg"),
    [
        ({"grant_type": "client_credential", "appid": "wx-other", "secret": SECRET}, 40013, "invalid appid"),
        ({"grant_type": "client_credential", "appid": APPID, "secret": "wrong"}, 40125, "invalid appsecret"),
        ({"grant_type": "password", "appid": APPID, "secret": SECRET}, 40002, "invalid grant_type"),
        ({"appid": APPID, "secret": SECRET}, 40002, "invalid grant_type"),
        ({"grant_type": "client_credential", "secret": SECRET}, 41002, "appid missing"),
        ({"grant_type": "client_credential", "appid": APPID}, 41004, "appsecret missing"),
        ({"grant_type": "client_credential", "appid": APPID, "secret": ""}, 40125, "invalid appsecret"),
    ],
)
def test_standin_token_errors(standin: str, params: dict, errcode: int, errmsg: str) -> None:
    response = _get(standin, "cgi-bin/token", **params)

    assert response.status_code == 200
    assert response.json() == {"errcode": errcode, "errmsg": errmsg}


def test_standin_login_success(standin: str) -> None:
    response = _login(standin, "resident-wire.1")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"openid", "session_key"}
    assert body["openid"] == derive_openid(APPID, "resident-wire")
    # A base64-encoded 16-byte key has 24 characters.
    assert len(body["session_key"]) == 24


def test_standin_login_with_issued_token(standin: str) -> None:
    token = _fetch_token(standin)

    response = _login(standin, "resident-wire-token.1", access_token=token)

    assert "openid" in response.json()


def test_standin_unknown_token_rejected(standin: str) -> None:
    response = _login(standin, "resident-wire-badtoken.1", access_token="never-issued")

    assert response.status_code == 200
    assert response.json()["errcode"] == 40001


def test_standin_code_single_use(standin: str) -> None:
    first = _login(standin, "resident-wire-once.1")
    second = _login(standin, "resident-wire-once.1")

    assert "openid" in first.json()
    assert second.status_code == 200
    assert second.json() == {"errcode": 40163, "errmsg": "code been used"}


@pytest.mark.parametrize(
    ("code", "errcode", "errmsg"),
    [
        ("invalid-anything", 40029, "invalid code"),
        ("has space", 40029, "invalid code"),
        ("slash/code", 40029, "invalid code"),
        ("x" * 129, 40029, "invalid code"),
        ("busy-1", -1, "system error"),
        ("ratelimit-1", 45011, "api minute-quota reach limit"),
        ("", 41008, "missing code"),
    ],
)
def test_standin_login_errors(standin: str, code: str, errcode: int, errmsg: str) -> None:
    response = _login(standin, code)

    assert response.status_code == 200
    assert response.json() == {"errcode": errcode, "errmsg": errmsg}


def test_standin_failed_code_not_consumed(standin: str) -> None:
    first = _login(standin, "busy-retry")
    second = _login(standin, "busy-retry")

    assert first.json()["errcode"] == -1
    assert second.json()["errcode"] == -1


def test_standin_longest_code_accepted(standin: str) -> None:
    response = _login(standin, "y" * 128)

    assert "openid" in response.json()


@pytest.mark.parametrize(
    ("params", "errcode"),
    [
        ({"appid": "wx-other"}, 40013),
        ({"secret": "wrong"}, 40125),
        ({"grant_type": "client_credential"}, 40002),
    ],
)
def test_standin_login_credential_errors(standin: str, params: dict, errcode: int) -> None:
    response = _login(standin, "resident-wire-cred.1", **params)

    assert response.json()["errcode"] == errcode


def test_standin_unknown_path_404(standin: str) -> None:
    response = _get(standin, "cgi-bin/nothing-here")

    assert response.status_code == 404


def test_standin_wrong_method_405(standin: str) -> None:
    response = requests.post(f"{standin}cgi-bin/token", timeout=HTTP_TIMEOUT_S)

    assert response.status_code == 405


def test_standin_calls_redacted(standin: str) -> None:
    token = _fetch_token(standin)
    _login(standin, "resident-wire-calls.1", access_token=token)

    calls = _calls(standin)

    assert len(calls) == 2
    token_call, login_call = calls
    assert token_call == {
        "method": "GET",
        "path": "/cgi-bin/token",
        "params": {"grant_type": "client_credential", "appid": APPID, "secret": "<redacted>"},
        "errcode": 0,
    }
    assert login_call["params"]["js_code"] == "<redacted>"
    assert login_call["params"]["secret"] == "<redacted>"
    assert login_call["params"]["access_token"] == "<redacted>"
    assert login_call["errcode"] == 0


def test_standin_reset_clears_state(standin: str) -> None:
    token = _fetch_token(standin)
    _login(standin, "resident-wire-reset.1")

    requests.post(f"{standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)

    assert _calls(standin) == []
    assert "openid" in _login(standin, "resident-wire-reset.1").json()
    assert _login(standin, "resident-wire-reset.2", access_token=token).json()["errcode"] == 40001


def test_standin_log_omits_secrets(standin: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wechat_standin")
    token = _fetch_token(standin)

    _login(standin, "resident-wire-log.1", access_token=token)

    lines = [record.getMessage() for record in caplog.records if record.name == "wechat_standin"]
    assert lines == [
        f"GET /cgi-bin/token appid={APPID} errcode=0",
        f"GET /sns/jscode2session appid={APPID} errcode=0",
    ]
    assert SECRET not in caplog.text
    assert token not in caplog.text
    assert "resident-wire-log" not in caplog.text


def test_open_standin_accepts_any_credentials(open_standin: str) -> None:
    token = _get(open_standin, "cgi-bin/token", grant_type="client_credential", appid="wx-any", secret="any")
    login_a = _login(open_standin, "resident-open.1", appid="wx-any", secret="any")
    login_b = _login(open_standin, "resident-open.2", appid="wx-another", secret="other")

    assert "access_token" in token.json()
    # The openid depends on the appid, as it does on WeChat.
    assert login_a.json()["openid"] == derive_openid("wx-any", "resident-open")
    assert login_b.json()["openid"] == derive_openid("wx-another", "resident-open")
    assert login_a.json()["openid"] != login_b.json()["openid"]


async def test_open_standin_accepts_empty_secret(open_standin: str) -> None:
    # Settings has an empty wechat_secret unless WECHAT_SECRET is set.
    gateway = WeChatGateway(Settings(wechat_api_base_url=open_standin, wechat_timeout_s=2.0))

    session = await gateway.code_to_session("resident-open-empty.1")
    gateway.close()

    assert session.openid == derive_openid(Settings.wechat_appid, "resident-open-empty")


def test_open_standin_still_requires_params(open_standin: str) -> None:
    without_appid = _get(
        open_standin, "sns/jscode2session", js_code="resident-open-params.1", grant_type="authorization_code"
    )
    without_secret = _get(open_standin, "cgi-bin/token", grant_type="client_credential", appid="wx-any")

    assert without_appid.json()["errcode"] == 41002
    assert without_secret.json()["errcode"] == 41004


# Access token shared through Redis


TOKEN_KEY = f"linli:wechat:{APPID}_access_token"
TOKEN_LOCK_KEY = f"{TOKEN_KEY}:lock"


@pytest.fixture
def token_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A Redis client on the test server, with this appid's cached token and lock removed."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(TOKEN_KEY, TOKEN_LOCK_KEY)
    yield client
    client.delete(TOKEN_KEY, TOKEN_LOCK_KEY)
    client.close()


@pytest.fixture
def delayed_token_standin() -> Iterator[str]:
    """Base URL of a stand-in that delays token responses by 0.3 s, so that clients overlap."""
    server = make_server("127.0.0.1", 0, appid=APPID, secret=SECRET, token_delay_s=0.3)
    base_url, thread = _start(server)
    yield base_url
    _stop(server, thread)


def _token_calls(base_url: str) -> list[dict]:
    return [call for call in _calls(base_url) if call["path"] == "/cgi-bin/token"]


def _store_token(client: redis.Redis, token: str, ttl_s: int = 600) -> None:
    # The JSON encoding that wechatpy's RedisStorage reads.
    client.set(TOKEN_KEY, json.dumps(token), ex=ttl_s)


async def test_token_shared_between_gateways(standin: str, token_redis: redis.Redis, redis_url: str) -> None:
    first = WeChatGateway(_settings(standin, redis_url=redis_url))
    second = WeChatGateway(_settings(standin, redis_url=redis_url))

    await first.code_to_session("resident-shared.1")
    session = await second.code_to_session("resident-shared.2")
    first.close()
    second.close()

    assert session.openid == derive_openid(APPID, "resident-shared")
    assert len(_token_calls(standin)) == 1
    assert token_redis.get(TOKEN_KEY) is not None


async def test_token_fetched_once_by_concurrent_gateways(
    delayed_token_standin: str, token_redis: redis.Redis, redis_url: str
) -> None:
    gateways = [WeChatGateway(_settings(delayed_token_standin, redis_url=redis_url)) for _ in range(5)]

    sessions = await asyncio.gather(
        *(gateway.code_to_session(f"resident-stampede-{index}.1") for index, gateway in enumerate(gateways))
    )
    for gateway in gateways:
        gateway.close()

    assert [session.openid for session in sessions] == [
        derive_openid(APPID, f"resident-stampede-{index}") for index in range(5)
    ]
    assert len(_token_calls(delayed_token_standin)) == 1
    assert token_redis.get(TOKEN_LOCK_KEY) is None


async def test_token_fetched_once_by_concurrent_threads(
    delayed_token_standin: str, token_redis: redis.Redis, redis_url: str
) -> None:
    gateway = WeChatGateway(_settings(delayed_token_standin, redis_url=redis_url))
    barrier = threading.Barrier(4)
    sessions: list[WeChatSession] = []

    def login(index: int) -> None:
        barrier.wait(timeout=5)
        sessions.append(asyncio.run(gateway.code_to_session(f"resident-thread-{index}.1")))

    threads = [threading.Thread(target=login, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    gateway.close()

    assert len(sessions) == 4
    assert len(_token_calls(delayed_token_standin)) == 1


async def test_token_cached_below_expires_in(standin: str, token_redis: redis.Redis, redis_url: str) -> None:
    gateway = WeChatGateway(_settings(standin, redis_url=redis_url))

    await gateway.code_to_session("resident-ttl.1")
    gateway.close()

    ttl_s = token_redis.ttl(TOKEN_KEY)
    assert 7200 - ACCESS_TOKEN_REFRESH_MARGIN_S - 5 <= ttl_s <= 7200 - ACCESS_TOKEN_REFRESH_MARGIN_S


async def test_token_refreshed_after_cache_ttl(token_redis: redis.Redis, redis_url: str) -> None:
    # expires_in 2 s is cached for 1 s, half of it, because it is shorter than the margin.
    server = make_server("127.0.0.1", 0, appid=APPID, secret=SECRET, token_ttl_s=2)
    base_url, thread = _start(server)
    gateway = WeChatGateway(_settings(base_url, redis_url=redis_url))
    try:
        await gateway.code_to_session("resident-expiry.1")
        assert 0 < token_redis.pttl(TOKEN_KEY) <= 1000
        await asyncio.sleep(1.2)
        await gateway.code_to_session("resident-expiry.2")
        token_calls = _token_calls(base_url)
    finally:
        gateway.close()
        _stop(server, thread)

    assert len(token_calls) == 2


async def test_memory_token_refreshed_after_cache_ttl() -> None:
    server = make_server("127.0.0.1", 0, appid=APPID, secret=SECRET, token_ttl_s=2)
    base_url, thread = _start(server)
    gateway = WeChatGateway(_settings(base_url))
    try:
        await gateway.code_to_session("resident-memory-expiry.1")
        await gateway.code_to_session("resident-memory-expiry.2")
        calls_before_expiry = len(_token_calls(base_url))
        await asyncio.sleep(1.2)
        await gateway.code_to_session("resident-memory-expiry.3")
        calls_after_expiry = len(_token_calls(base_url))
    finally:
        gateway.close()
        _stop(server, thread)

    assert calls_before_expiry == 1
    assert calls_after_expiry == 2


async def test_waiter_reads_token_of_lock_holder(standin: str, token_redis: redis.Redis, redis_url: str) -> None:
    # Another process holds the lock and stores its token 0.3 s later.
    holder_token = _fetch_token(standin)
    token_redis.set(TOKEN_LOCK_KEY, "other-process", px=5000)
    timer = threading.Timer(0.3, _store_token, args=(token_redis, holder_token))
    timer.start()
    gateway = WeChatGateway(_settings(standin, redis_url=redis_url))

    started = time.monotonic()
    session = await gateway.code_to_session("resident-waiter.1")
    elapsed = time.monotonic() - started
    timer.join()
    gateway.close()

    assert session.openid == derive_openid(APPID, "resident-waiter")
    assert elapsed >= 0.25
    # Only the test's own fetch above: the gateway waited and used the holder's token.
    assert len(_token_calls(standin)) == 1
    assert token_redis.get(TOKEN_LOCK_KEY) == "other-process"


async def test_lock_of_crashed_holder_expires(standin: str, token_redis: redis.Redis, redis_url: str) -> None:
    # A process took the lock and stopped before storing a token.
    token_redis.set(TOKEN_LOCK_KEY, "crashed-process", px=400)
    gateway = WeChatGateway(_settings(standin, redis_url=redis_url))

    started = time.monotonic()
    await gateway.code_to_session("resident-crashed.1")
    elapsed = time.monotonic() - started
    gateway.close()

    assert elapsed >= 0.35
    assert len(_token_calls(standin)) == 1
    assert token_redis.get(TOKEN_LOCK_KEY) is None


async def test_lock_release_spares_other_holder(standin: str, token_redis: redis.Redis, redis_url: str) -> None:
    gateway = WeChatGateway(_settings(standin, redis_url=redis_url))
    token_redis.set(TOKEN_LOCK_KEY, "other-process", px=5000)

    gateway._client._release_refresh_lock("expired-lock-of-this-process")
    lock_after_wrong_release = token_redis.get(TOKEN_LOCK_KEY)
    gateway._client._release_refresh_lock("other-process")
    gateway.close()

    assert lock_after_wrong_release == "other-process"
    assert token_redis.get(TOKEN_LOCK_KEY) is None


async def test_rejected_shared_token_refreshed_once(
    delayed_token_standin: str, token_redis: redis.Redis, redis_url: str
) -> None:
    first = WeChatGateway(_settings(delayed_token_standin, redis_url=redis_url))
    second = WeChatGateway(_settings(delayed_token_standin, redis_url=redis_url))
    await first.code_to_session("resident-stale-warmup.1")
    # The reset makes the cached token unknown to the stand-in, as a token fetched elsewhere would.
    requests.post(f"{delayed_token_standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)

    sessions = await asyncio.gather(
        first.code_to_session("resident-stale-a.1"), second.code_to_session("resident-stale-b.1")
    )
    first.close()
    second.close()

    assert [session.openid for session in sessions] == [
        derive_openid(APPID, "resident-stale-a"),
        derive_openid(APPID, "resident-stale-b"),
    ]
    calls = [(call["path"], call["errcode"]) for call in _calls(delayed_token_standin)]
    assert calls.count(("/sns/jscode2session", 40001)) == 2
    assert calls.count(("/cgi-bin/token", 0)) == 1


async def test_gateways_without_redis_fetch_own_tokens(standin: str) -> None:
    first = WeChatGateway(_settings(standin))
    second = WeChatGateway(_settings(standin))

    await first.code_to_session("resident-memory-a.1")
    await second.code_to_session("resident-memory-b.1")
    first.close()
    second.close()

    assert len(_token_calls(standin)) == 2


async def test_redis_down_login_unavailable(standin: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    gateway = WeChatGateway(_settings(standin, redis_url="redis://127.0.0.1:1/0"))

    with pytest.raises(WeChatUnavailable):
        await gateway.code_to_session("resident-redis-down.1")
    gateway.close()

    assert "Redis failed while reading the WeChat access token for code2Session: ConnectionError" in caplog.text
    assert _calls(standin) == []


# Subscribe messages


SUBSCRIBE_PATH = "/cgi-bin/message/subscribe/send"
MESSAGE_DATA = {
    "thing1": {"value": "养老照护"},
    "phrase2": {"value": "已接单"},
    "time3": {"value": "2025年3月8日 09:30"},
    "thing4": {"value": "社工已接单，可在小程序查看进度"},
}


def _subscribe_messages(base_url: str) -> list[dict]:
    response = requests.get(f"{base_url}__standin__/subscribe-messages", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return response.json()


def _script(base_url: str, openid: str, errcodes: list) -> requests.Response:
    return requests.post(
        f"{base_url}__standin__/script", json={"openid": openid, "errcodes": errcodes}, timeout=HTTP_TIMEOUT_S
    )


def _unsubscribe(base_url: str, openid: str) -> requests.Response:
    return requests.post(f"{base_url}__standin__/unsubscribe", json={"openid": openid}, timeout=HTTP_TIMEOUT_S)


async def test_send_recorded_by_standin(gateway: WeChatGateway, standin: str) -> None:
    await gateway.send_subscribe_message("o-send-recorded", "tpl-status", MESSAGE_DATA, page="pages/index/index")

    assert _subscribe_messages(standin) == [
        {"touser": "o-send-recorded", "template_id": "tpl-status", "page": "pages/index/index", "data": MESSAGE_DATA}
    ]
    # A slow login from an earlier test may still finish and be recorded after the send.
    send_calls = [call for call in _calls(standin) if call["path"] == SUBSCRIBE_PATH]
    assert len(send_calls) == 1
    send_call = send_calls[0]
    assert send_call["errcode"] == 0
    assert send_call["params"] == {"access_token": "<redacted>"}


async def test_send_without_page_omits_it(gateway: WeChatGateway, standin: str) -> None:
    await gateway.send_subscribe_message("o-send-nopage", "tpl-status", MESSAGE_DATA)

    [message] = _subscribe_messages(standin)
    assert "page" not in message


@pytest.mark.parametrize("errcode", [-1, 45009])
async def test_send_transient_retryable(gateway: WeChatGateway, standin: str, errcode: int) -> None:
    _script(standin, "o-send-transient", [errcode])

    with pytest.raises(WeChatSendRetryable) as caught:
        await gateway.send_subscribe_message("o-send-transient", "tpl-status", MESSAGE_DATA)

    assert caught.value.errcode == errcode
    assert isinstance(caught.value, WeChatSendError)
    assert _subscribe_messages(standin) == []


async def test_send_unsubscribed_not_subscribed(gateway: WeChatGateway, standin: str) -> None:
    _unsubscribe(standin, "o-send-unsubscribed")

    with pytest.raises(WeChatUserNotSubscribed) as caught:
        await gateway.send_subscribe_message("o-send-unsubscribed", "tpl-status", MESSAGE_DATA)

    assert caught.value.errcode == 43101


@pytest.mark.parametrize(
    ("openid", "template_id", "data", "errcode"),
    [
        ("", "tpl-status", MESSAGE_DATA, 40003),
        ("o-send-bad", "", MESSAGE_DATA, 40037),
        ("o-send-bad", "tpl-status", {"thing1": {"value": "超" * 21}}, 47003),
        ("o-send-bad", "tpl-status", {"phrase2": {"value": "接单了abc"}}, 47003),
    ],
)
async def test_send_invalid_rejected(gateway: WeChatGateway, openid: str, template_id: str, data: dict, errcode: int) -> None:
    with pytest.raises(WeChatSendRejected) as caught:
        await gateway.send_subscribe_message(openid, template_id, data)

    assert caught.value.errcode == errcode


async def test_send_connection_refused_retryable() -> None:
    gateway = WeChatGateway(_settings(f"http://127.0.0.1:{_free_port()}/"))

    with pytest.raises(WeChatSendRetryable) as caught:
        await gateway.send_subscribe_message("o-send-refused", "tpl-status", MESSAGE_DATA)
    gateway.close()

    assert caught.value.errcode is None
    assert caught.value.__cause__ is None


async def test_send_wrong_secret_retryable(standin: str) -> None:
    gateway = WeChatGateway(_settings(standin, wechat_secret="wrong-secret"))

    with pytest.raises(WeChatSendRetryable) as caught:
        await gateway.send_subscribe_message("o-send-secret", "tpl-status", MESSAGE_DATA)
    gateway.close()

    assert caught.value.errcode == 40125


async def test_send_refreshes_rejected_token(gateway: WeChatGateway, standin: str) -> None:
    await gateway.send_subscribe_message("o-send-refresh", "tpl-status", MESSAGE_DATA)
    requests.post(f"{standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)

    await gateway.send_subscribe_message("o-send-refresh", "tpl-status", MESSAGE_DATA)

    calls = [(call["path"], call["errcode"]) for call in _calls(standin)]
    assert calls == [(SUBSCRIBE_PATH, 40001), ("/cgi-bin/token", 0), (SUBSCRIBE_PATH, 0)]


async def test_send_log_masks_openid(gateway: WeChatGateway, standin: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")
    _script(standin, "o-send-masked-openid-4321", [-1])

    with pytest.raises(WeChatSendRetryable):
        await gateway.send_subscribe_message("o-send-masked-openid-4321", "tpl-status", MESSAGE_DATA)

    assert "errcode=-1" in caplog.text
    assert "openid=o-se***4321" in caplog.text
    assert "o-send-masked-openid-4321" not in caplog.text


# Content check


@pytest.mark.parametrize(
    ("content", "suggest"),
    [("家中老人需要上门陪伴", "pass"), ("这段话待审核", "review"), ("含有违禁内容", "risky")],
)
async def test_check_text_suggestion(gateway: WeChatGateway, standin: str, content: str, suggest: str) -> None:
    result = await gateway.check_text(content, "o-check-user", 3)

    assert result == suggest
    check_call = [call for call in _calls(standin) if call["path"] == "/wxa/msg_sec_check"][-1]
    assert check_call["body"] == {"content": content, "version": 2, "scene": 3, "openid": "o-check-user"}


async def test_check_text_busy_unavailable(gateway: WeChatGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.wechat")

    with pytest.raises(WeChatUnavailable):
        await gateway.check_text("内容 [busy]", "o-check-busy-openid-9876", 2)

    assert "WeChat msgSecCheck failed: errcode=-1" in caplog.text
    assert "o-check-busy-openid-9876" not in caplog.text
    assert "内容" not in caplog.text


async def test_check_text_timeout_unavailable(standin: str) -> None:
    # The stand-in's slow delay is 10 s, far beyond the 1.5 s deadline.
    gateway = WeChatGateway(_settings(standin, wechat_timeout_s=0.5))

    started = time.monotonic()
    with pytest.raises(WeChatUnavailable):
        await gateway.check_text("内容 [slow]", "o-check-slow", 2)
    elapsed = time.monotonic() - started
    gateway.close()

    assert elapsed < 2.5


@pytest.mark.parametrize(("content", "scene"), [("内容", 0), ("内容", 5), ("", 2)])
async def test_check_text_bad_arguments(gateway: WeChatGateway, standin: str, content: str, scene: int) -> None:
    with pytest.raises(ValueError):
        await gateway.check_text(content, "o-check-args", scene)

    assert _calls(standin) == []


# Stand-in wire format of the POST APIs


def _post_api(base_url: str, path: str, body: object, token: str | None) -> dict:
    params = {} if token is None else {"access_token": token}
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    response = requests.post(f"{base_url}{path}", params=params, data=data, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return response.json()


def _send_body(**overrides: object) -> dict:
    body = {"touser": "o-wire-user", "template_id": "tpl-wire", "data": MESSAGE_DATA}
    body.update(overrides)
    return body


def test_standin_send_success(standin: str) -> None:
    token = _fetch_token(standin)

    answer = _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)

    assert answer == {"errcode": 0, "errmsg": "ok"}
    assert _subscribe_messages(standin) == [_send_body()]


@pytest.mark.parametrize(
    ("token", "body", "errcode"),
    [
        (None, _send_body(), 41001),
        ("never-issued", _send_body(), 40001),
        ("issued", b"not json", 47001),
        ("issued", [1, 2], 47001),
        ("issued", _send_body(touser=""), 40003),
        ("issued", _send_body(template_id=None), 40037),
        ("issued", _send_body(page=5), 41030),
        ("issued", _send_body(data={}), 47003),
        ("issued", _send_body(data={"title1": {"value": "x"}}), 47003),
        ("issued", _send_body(data={"thing1": "x"}), 47003),
        ("issued", _send_body(data={"thing1": {"value": ""}}), 47003),
        ("issued", _send_body(data={"time3": {"value": "明天上午"}}), 47003),
        ("issued", _send_body(data={"number5": {"value": "12a"}}), 47003),
    ],
)
def test_standin_send_errors(standin: str, token: str | None, body: object, errcode: int) -> None:
    if token == "issued":
        token = _fetch_token(standin)

    answer = _post_api(standin, "cgi-bin/message/subscribe/send", body, token)

    assert answer["errcode"] == errcode
    assert answer["errmsg"]
    assert _subscribe_messages(standin) == []


def test_standin_send_invalid_value_errmsg(standin: str) -> None:
    answer = _post_api(
        standin,
        "cgi-bin/message/subscribe/send",
        _send_body(data={"phrase2": {"value": "六个汉字太长"}}),
        _fetch_token(standin),
    )

    assert answer == {"errcode": 47003, "errmsg": "argument invalid! data.phrase2.value invalid"}


def test_standin_script_in_order(standin: str) -> None:
    token = _fetch_token(standin)
    assert _script(standin, "o-wire-user", [-1, 45009]).status_code == 204

    answers = [_post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token) for _ in range(3)]

    assert [answer["errcode"] for answer in answers] == [-1, 45009, 0]
    assert answers[1]["errmsg"] == "reach max api daily quota limit"
    assert len(_subscribe_messages(standin)) == 1


def test_standin_script_other_openid_unaffected(standin: str) -> None:
    token = _fetch_token(standin)
    _script(standin, "o-wire-other", [-1])

    answer = _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)

    assert answer["errcode"] == 0


def test_standin_unsubscribed_always_43101(standin: str) -> None:
    token = _fetch_token(standin)
    assert _unsubscribe(standin, "o-wire-user").status_code == 204

    answers = [_post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token) for _ in range(2)]

    assert answers == [{"errcode": 43101, "errmsg": "user refuse to accept the msg"}] * 2


def test_standin_script_before_unsubscribe(standin: str) -> None:
    token = _fetch_token(standin)
    _unsubscribe(standin, "o-wire-user")
    _script(standin, "o-wire-user", [-1])

    answers = [_post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token) for _ in range(2)]

    assert [answer["errcode"] for answer in answers] == [-1, 43101]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("script", {"openid": "o-x"}),
        ("script", {"openid": "o-x", "errcodes": []}),
        ("script", {"openid": "o-x", "errcodes": ["-1"]}),
        ("script", {"openid": "o-x", "errcodes": [True]}),
        ("script", {"errcodes": [-1]}),
        ("unsubscribe", {"openid": ""}),
        ("unsubscribe", ["o-x"]),
    ],
)
def test_standin_control_bad_body_400(standin: str, path: str, body: object) -> None:
    response = requests.post(f"{standin}__standin__/{path}", json=body, timeout=HTTP_TIMEOUT_S)

    assert response.status_code == 400
    assert response.json()["error"]


def test_standin_reset_clears_messages_and_scripts(standin: str) -> None:
    token = _fetch_token(standin)
    _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)
    _script(standin, "o-wire-user", [-1])
    _unsubscribe(standin, "o-wire-other")

    requests.post(f"{standin}__standin__/reset", timeout=HTTP_TIMEOUT_S)
    token = _fetch_token(standin)

    assert _subscribe_messages(standin) == []
    assert _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)["errcode"] == 0
    other = _send_body(touser="o-wire-other")
    assert _post_api(standin, "cgi-bin/message/subscribe/send", other, token)["errcode"] == 0


def test_standin_post_call_recorded(standin: str) -> None:
    token = _fetch_token(standin)

    _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)

    send_call = [call for call in _calls(standin) if call["path"] == SUBSCRIBE_PATH][-1]
    assert send_call == {
        "method": "POST",
        "path": SUBSCRIBE_PATH,
        "params": {"access_token": "<redacted>"},
        "body": _send_body(),
        "errcode": 0,
    }


def test_standin_post_log_omits_body(standin: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wechat_standin")
    token = _fetch_token(standin)

    _post_api(standin, "cgi-bin/message/subscribe/send", _send_body(), token)
    _post_api(standin, "wxa/msg_sec_check", {"content": "私密内容", "version": 2, "scene": 1, "openid": "o-w"}, token)

    lines = [record.getMessage() for record in caplog.records if record.name == "wechat_standin"]
    assert lines[-2:] == [f"POST {SUBSCRIBE_PATH} errcode=0", "POST /wxa/msg_sec_check errcode=0"]
    assert "o-wire-user" not in caplog.text
    assert "私密内容" not in caplog.text
    assert token not in caplog.text


def test_standin_oversized_body_413(standin: str) -> None:
    response = requests.post(
        f"{standin}cgi-bin/message/subscribe/send", data=b"x" * (64 * 1024 + 1), timeout=HTTP_TIMEOUT_S
    )

    assert response.status_code == 413


@pytest.mark.parametrize("path", ["cgi-bin/message/subscribe/send", "wxa/msg_sec_check", "__standin__/script"])
def test_standin_post_routes_reject_get(standin: str, path: str) -> None:
    response = _get(standin, path)

    assert response.status_code == 405


def test_standin_check_text_answer(standin: str) -> None:
    token = _fetch_token(standin)

    answer = _post_api(
        standin, "wxa/msg_sec_check", {"content": "含有违禁内容", "version": 2, "scene": 2, "openid": "o-w"}, token
    )

    assert answer["errcode"] == 0
    assert answer["result"] == {"suggest": "risky", "label": 20006}
    assert answer["detail"][0]["suggest"] == "risky"
    assert answer["trace_id"]


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        ({"content": "x", "scene": 2, "openid": "o-w"}, 47001),
        ({"content": "x", "version": 1, "scene": 2, "openid": "o-w"}, 47001),
        ({"content": "x", "version": 2, "scene": 9, "openid": "o-w"}, 47001),
        ({"content": "x", "version": 2, "scene": True, "openid": "o-w"}, 47001),
        ({"version": 2, "scene": 2, "openid": "o-w"}, 47001),
        ({"content": "x", "version": 2, "scene": 2}, 40003),
        ({"content": "x [busy]", "version": 2, "scene": 2, "openid": "o-w"}, -1),
    ],
)
def test_standin_check_text_errors(standin: str, body: dict, errcode: int) -> None:
    answer = _post_api(standin, "wxa/msg_sec_check", body, _fetch_token(standin))

    assert answer["errcode"] == errcode
    assert "result" not in answer


def test_standin_check_text_version_string(standin: str) -> None:
    body = {"content": "待审", "version": "2", "scene": 4, "openid": "o-w"}

    answer = _post_api(standin, "wxa/msg_sec_check", body, _fetch_token(standin))

    assert answer["result"]["suggest"] == "review"
