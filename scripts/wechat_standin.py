"""Stand-in for the WeChat server API, for local runs and tests on loopback.

It serves GET /cgi-bin/token and GET /sns/jscode2session in WeChat's wire format:
JSON bodies, and HTTP 200 with {"errcode": N, "errmsg": "..."} for every API error.
Point WECHAT_API_BASE_URL at it, for example http://127.0.0.1:8001/.

Login codes are 1-128 characters of [A-Za-z0-9_.-] and each works once. The openid
comes from the appid and the part of the code before the first '.', so "resident-a.1"
and "resident-a.2" log in as the same person. Codes with these prefixes fail on purpose:

    invalid...    errcode 40029 "invalid code"
    busy...       errcode -1 "system error"
    ratelimit...  errcode 45011 "api minute-quota reach limit"
    blocked...    errcode 40226, WeChat blocking a high-risk user's login
    slow...       succeeds after a delay (10 s by default), to test client timeouts

Two extra routes help tests: GET /__standin__/calls returns the API calls received
(secret, js_code and access_token values redacted), and POST /__standin__/reset
clears issued access tokens, used codes and recorded calls.

Run: python scripts/wechat_standin.py --host 127.0.0.1 --port 8001 [--appid X --secret Y]
Without --appid or --secret the stand-in accepts any value for that parameter, even an
empty one, but the parameter must be present.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("wechat_standin")

TOKEN_TTL_S = 7200
DEFAULT_SLOW_DELAY_S = 10.0
CODE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
OPENID_HASH_LENGTH = 27
SESSION_KEY_BYTES = 16
MAX_DISCARDED_BODY_BYTES = 64 * 1024

TOKEN_PATH = "/cgi-bin/token"
JSCODE2SESSION_PATH = "/sns/jscode2session"
CALLS_PATH = "/__standin__/calls"
RESET_PATH = "/__standin__/reset"

# Parameters whose values /__standin__/calls replaces with REDACTED. Log lines omit them.
REDACTED_PARAMS = frozenset({"secret", "js_code", "access_token"})
REDACTED = "<redacted>"


class ApiError(Exception):
    """A WeChat API error, sent as {"errcode", "errmsg"} with HTTP 200."""

    def __init__(self, errcode: int, errmsg: str):
        super().__init__(f"{errcode} {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg

    def to_body(self) -> dict:
        return {"errcode": self.errcode, "errmsg": self.errmsg}


class WeChatStandinServer(ThreadingHTTPServer):
    """HTTP server that stores the stand-in's state: access tokens, used codes and calls."""

    # Handler threads of slow codes must not keep the process alive or block server_close().
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        appid: str | None,
        secret: str | None,
        slow_delay_s: float,
    ):
        super().__init__(address, StandinRequestHandler)
        self.appid = appid
        self.secret = secret
        self.slow_delay_s = slow_delay_s
        self._lock = threading.Lock()
        self._token_expiry: dict[str, float] = {}  # access token -> time.monotonic() deadline
        self._used_codes: set[str] = set()
        self._calls: list[dict] = []

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._token_expiry[token] = time.monotonic() + TOKEN_TTL_S
        return token

    def is_token_valid(self, token: str) -> bool:
        with self._lock:
            deadline = self._token_expiry.get(token)
        return deadline is not None and time.monotonic() < deadline

    def claim_code(self, code: str) -> bool:
        """Mark a login code as used and return False if it was used before."""
        with self._lock:
            if code in self._used_codes:
                return False
            self._used_codes.add(code)
            return True

    def record_call(self, call: dict) -> None:
        with self._lock:
            self._calls.append(call)

    def list_calls(self) -> list[dict]:
        with self._lock:
            return list(self._calls)

    def reset(self) -> None:
        with self._lock:
            self._token_expiry.clear()
            self._used_codes.clear()
            self._calls.clear()


def _check_credentials(server: WeChatStandinServer, params: dict[str, str]) -> None:
    # An unchecked parameter accepts any value, even an empty one, so a dev setup without
    # WECHAT_SECRET can log in. It must still be present in the query.
    if "appid" not in params:
        raise ApiError(41002, "appid missing")
    if server.appid is not None and params["appid"] != server.appid:
        raise ApiError(40013, "invalid appid")
    if "secret" not in params:
        raise ApiError(41004, "appsecret missing")
    if server.secret is not None and not hmac.compare_digest(params["secret"].encode(), server.secret.encode()):
        raise ApiError(40125, "invalid appsecret")


def derive_openid(appid: str, code: str) -> str:
    """Return the stand-in openid for a code: "o" plus 27 characters of a SHA-256 hash.

    Only the part of the code before the first '.' counts, so one person can log in
    many times with fresh codes such as "resident-a.1" and "resident-a.2".
    """
    person = code.split(".", 1)[0]
    digest = hashlib.sha256(f"{appid}\0{person}".encode()).digest()
    return "o" + base64.urlsafe_b64encode(digest).decode()[:OPENID_HASH_LENGTH]


def handle_token(server: WeChatStandinServer, params: dict[str, str]) -> dict:
    if params.get("grant_type") != "client_credential":
        raise ApiError(40002, "invalid grant_type")
    _check_credentials(server, params)
    return {"access_token": server.issue_token(), "expires_in": TOKEN_TTL_S}


def handle_jscode2session(server: WeChatStandinServer, params: dict[str, str]) -> dict:
    if params.get("grant_type") != "authorization_code":
        raise ApiError(40002, "invalid grant_type")
    _check_credentials(server, params)

    # WeChat does not need an access token here, but wechatpy sends one with every call,
    # so a token that the stand-in never issued, or cleared on reset, is rejected.
    access_token = params.get("access_token")
    if access_token is not None and not server.is_token_valid(access_token):
        raise ApiError(40001, "invalid credential, access_token is invalid or not latest")

    code = params.get("js_code", "")
    if not code:
        raise ApiError(41008, "missing code")
    if not CODE_PATTERN.fullmatch(code) or code.startswith("invalid"):
        raise ApiError(40029, "invalid code")
    if code.startswith("busy"):
        raise ApiError(-1, "system error")
    if code.startswith("ratelimit"):
        raise ApiError(45011, "api minute-quota reach limit")
    if code.startswith("blocked"):
        raise ApiError(40226, "high risk user")

    # Claim the code before the delay of a slow code, so a second use during the delay fails too.
    if not server.claim_code(code):
        raise ApiError(40163, "code been used")
    if code.startswith("slow"):
        time.sleep(server.slow_delay_s)

    session_key = base64.b64encode(secrets.token_bytes(SESSION_KEY_BYTES)).decode()
    return {"openid": derive_openid(params["appid"], code), "session_key": session_key}


API_HANDLERS = {
    TOKEN_PATH: handle_token,
    JSCODE2SESSION_PATH: handle_jscode2session,
}


def _redact(params: dict[str, str]) -> dict[str, str]:
    return {name: REDACTED if name in REDACTED_PARAMS else value for name, value in params.items()}


class StandinRequestHandler(BaseHTTPRequestHandler):
    server: WeChatStandinServer
    server_version = "WeChatStandin/1.0"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == CALLS_PATH:
            logger.info("GET %s", url.path)
            self._send_json(200, self.server.list_calls())
            return

        handler = API_HANDLERS.get(url.path)
        if handler is None:
            self._reject_unknown(url.path)
            return

        # WeChat reads the first value of a repeated parameter.
        params = {name: values[0] for name, values in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = handler(self.server, params)
            errcode = 0
        except ApiError as error:
            body = error.to_body()
            errcode = error.errcode

        self.server.record_call({"method": "GET", "path": url.path, "params": _redact(params), "errcode": errcode})
        logger.info("GET %s appid=%s errcode=%d", url.path, params.get("appid", "-"), errcode)
        self._send_json(200, body)

    def do_POST(self) -> None:
        self._discard_body()
        url = urlsplit(self.path)
        if url.path == RESET_PATH:
            self.server.reset()
            logger.info("POST %s", url.path)
            self.send_response(204)
            self.end_headers()
            return
        self._reject_unknown(url.path)

    def _reject_unknown(self, path: str) -> None:
        known_paths = (*API_HANDLERS, CALLS_PATH, RESET_PATH)
        status = 405 if path in known_paths else 404
        logger.info("%s %s status=%d", self.command, path, status)
        self._send_json(status, {"error": "method not allowed" if status == 405 else "not found"})

    def _discard_body(self) -> None:
        # Read the request body so that closing the connection does not reset it under the client.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(min(length, MAX_DISCARDED_BODY_BYTES))

    def _send_json(self, status: int, body: object) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # Expected after a slow code: the client has usually given up by then.
            path = self.path.split("?", 1)[0]
            logger.info("%s %s: client closed the connection before the response was sent", self.command, path)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The default access log prints the query string, which contains the secret and js_code.
        # do_GET and do_POST log one redacted line per call instead.
        pass

    def log_error(self, format: str, *args: object) -> None:
        # Arguments such as a malformed request line may contain the query string, so cut it off.
        safe_args = tuple(arg.split("?", 1)[0] if isinstance(arg, str) else arg for arg in args)
        logger.warning("request from %s failed: %s", self.client_address[0], format % safe_args)


def make_server(
    host: str = "127.0.0.1",
    port: int = 0,
    appid: str | None = None,
    secret: str | None = None,
    slow_delay_s: float = DEFAULT_SLOW_DELAY_S,
) -> WeChatStandinServer:
    """Bind the stand-in (port 0 picks a free port) without starting to serve.

    Call serve_forever() on the result, for example in a daemon thread, and read the
    bound port from server_address. An appid or secret of None accepts any value.
    """
    return WeChatStandinServer((host, port), appid=appid, secret=secret, slow_delay_s=slow_delay_s)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a stand-in for the WeChat server API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port to listen on (default: 8001)")
    parser.add_argument("--appid", help="AppID that callers must send (default: accept any)")
    parser.add_argument("--secret", help="AppSecret that callers must send (default: accept any)")
    parser.add_argument(
        "--slow-delay",
        type=float,
        default=DEFAULT_SLOW_DELAY_S,
        help=f"seconds that codes starting with 'slow' wait before the response (default: {DEFAULT_SLOW_DELAY_S:g})",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = make_server(args.host, args.port, args.appid, args.secret, args.slow_delay)
    host, port = server.server_address[:2]
    logger.info(
        "WeChat stand-in listening on http://%s:%d/ (appid: %s, secret: %s)",
        host,
        port,
        args.appid or "any",
        "checked" if args.secret else "any",
    )
    # Turn SIGTERM into SystemExit so that the finally block closes the socket and logs the stop.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        logger.info("WeChat stand-in stopped")


if __name__ == "__main__":
    main()
