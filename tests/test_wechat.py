"""WeChatGateway against the WeChat stand-in, and the stand-in's wire format over HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from wechatpy.client import WeChatClient
from wechatpy.client.api.wxa import WeChatWxa

from backend.errors import RateLimited, ServiceUnavailable, Unauthorized
from backend.settings import Settings
from backend.wechat import (
    WeChatCodeInvalid,
    WeChatGateway,
    WeChatRateLimited,
    WeChatSession,
    WeChatUnavailable,
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
