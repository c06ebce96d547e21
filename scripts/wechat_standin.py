"""Stand-in for the WeChat server API, for local runs and tests on loopback.

It serves these APIs in WeChat's wire format: JSON bodies, and HTTP 200 with
{"errcode": N, "errmsg": "..."} for every API error. Point WECHAT_API_BASE_URL at it,
for example http://127.0.0.1:8001/.

    GET  /cgi-bin/token                   access tokens (TOKEN_TTL_S unless make_server sets another)
    GET  /sns/jscode2session              login codes
    POST /cgi-bin/message/subscribe/send  subscribe messages
    POST /wxa/msg_sec_check               text content check, version 2 only

Login codes are 1-128 characters of [A-Za-z0-9_.-] and each works once. The openid
comes from the appid and the part of the code before the first '.', so "resident-a.1"
and "resident-a.2" log in as the same person. Codes with these prefixes fail on purpose:

    invalid...    errcode 40029 "invalid code"
    busy...       errcode -1 "system error"
    ratelimit...  errcode 45011 "api minute-quota reach limit"
    blocked...    errcode 40226, WeChat blocking a high-risk user's login
    slow...       succeeds after a delay (10 s by default), to test client timeouts

Both POST APIs need an access_token that the stand-in issued (errcode 41001 when it is
missing, 40001 when it is unknown) and a JSON object body (47001 otherwise).

Subscribe messages need touser (40003), template_id (40037) and data, whose keys are
WeChat's parameter types with a number, such as "thing1", each {"value": "..."} within
WeChat's length limit for its type (47003 "argument invalid! data.thing1.value invalid").
Then, in this order, a scripted errcode for the openid is returned, an unsubscribed openid
gets 43101, and otherwise the message is accepted and listed by GET
/__standin__/subscribe-messages.

msgSecCheck needs "version": 2, a "scene" of 1 to 4 and a "content" string (47001), and
an "openid" (40003). Its result.suggest is "risky" for content containing 违禁, "review"
for content containing 待审, and "pass" otherwise. Two markers in the content simulate
failures: "[busy]" returns errcode -1, and "[slow]" delays the response as much as a slow code.

Routes for tests:

    GET  /__standin__/calls                API calls received, in order (secret, js_code and
                                           access_token values redacted, POST bodies included)
    GET  /__standin__/subscribe-messages   bodies of the subscribe messages accepted
    POST /__standin__/script               {"openid": "...", "errcodes": [-1, 45009]}: the next
                                           sends to that openid fail with these errcodes in order
    POST /__standin__/unsubscribe          {"openid": "..."}: every later send to it gets 43101
    POST /__standin__/reset                clears issued access tokens, used codes, calls,
                                           accepted messages, scripted errcodes and unsubscribes

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
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("wechat_standin")

TOKEN_TTL_S = 7200
DEFAULT_SLOW_DELAY_S = 10.0
CODE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
OPENID_HASH_LENGTH = 27
SESSION_KEY_BYTES = 16
MAX_BODY_BYTES = 64 * 1024

TOKEN_PATH = "/cgi-bin/token"
JSCODE2SESSION_PATH = "/sns/jscode2session"
SUBSCRIBE_SEND_PATH = "/cgi-bin/message/subscribe/send"
MSG_SEC_CHECK_PATH = "/wxa/msg_sec_check"
CALLS_PATH = "/__standin__/calls"
SUBSCRIBE_MESSAGES_PATH = "/__standin__/subscribe-messages"
SCRIPT_PATH = "/__standin__/script"
UNSUBSCRIBE_PATH = "/__standin__/unsubscribe"
RESET_PATH = "/__standin__/reset"

# Parameters whose values /__standin__/calls replaces with REDACTED. Log lines omit them.
REDACTED_PARAMS = frozenset({"secret", "js_code", "access_token"})
REDACTED = "<redacted>"

# errmsg texts for errcodes that tests script; WeChat appends a request id, the stand-in does not.
SCRIPTED_ERRMSGS = {
    -1: "system error",
    40003: "invalid openid",
    40037: "invalid template_id",
    43101: "user refuse to accept the msg",
    45009: "reach max api daily quota limit",
    47003: "argument invalid!",
}

# Length and character limits of subscribe-message values per parameter type, from the
# "参数值内容限制说明" table of WeChat's subscribeMessage.send documentation, as quoted in
# WeChat developer community answers.
_DATE = r"(?:\d{4}年\d{1,2}月\d{1,2}日|\d{4}-\d{1,2}-\d{1,2})"
_CLOCK = r"\d{1,2}:\d{2}"
_TIME = rf"(?:{_DATE} )?{_CLOCK}"
_DATE_TIME = rf"{_DATE}(?: {_CLOCK})?"
SUBSCRIBE_VALUE_PATTERNS = {
    "thing": re.compile(r".{1,20}", re.DOTALL),
    "number": re.compile(r"\d{1,32}(?:\.\d+)?"),
    "letter": re.compile(r"[A-Za-z]{1,32}"),
    "symbol": re.compile(r"[^\sA-Za-z0-9\u4e00-\u9fff]{1,5}"),
    "character_string": re.compile(r"[\x21-\x7e]{1,32}"),
    "time": re.compile(rf"{_TIME}(?:~{_TIME})?"),
    "date": re.compile(rf"{_DATE_TIME}(?:~{_DATE_TIME})?"),
    "amount": re.compile(r"[¥￥$€£]?\d{1,10}(?:\.\d+)?元?"),
    "phone_number": re.compile(r"[0-9+\-() ]{1,17}"),
    "car_number": re.compile(r".{1,8}"),
    "name": re.compile(r"[\u4e00-\u9fff]{1,10}|[A-Za-z .·-]{1,20}"),
    "phrase": re.compile(r"[\u4e00-\u9fff]{1,5}"),
    "enum": re.compile(r".{1,20}", re.DOTALL),
}
SUBSCRIBE_KEY_PATTERN = re.compile(rf"({'|'.join(SUBSCRIBE_VALUE_PATTERNS)})\d+")

# msgSecCheck results: the words that trigger each suggestion, and the labels sent with them
# (100 normal, 20006 illegal or criminal, 21000 other).
# NOTE: the label numbers are unchecked against WeChat's label list. The gateway reads only suggest.
RISKY_WORD = "违禁"
REVIEW_WORD = "待审"
BUSY_MARKER = "[busy]"
SLOW_MARKER = "[slow]"
LABEL_NORMAL = 100
LABEL_ILLEGAL = 20006
LABEL_OTHER = 21000


class ApiError(Exception):
    """A WeChat API error, sent as {"errcode", "errmsg"} with HTTP 200."""

    def __init__(self, errcode: int, errmsg: str):
        super().__init__(f"{errcode} {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg

    def to_body(self) -> dict:
        return {"errcode": self.errcode, "errmsg": self.errmsg}


class ControlError(Exception):
    """A malformed request to one of the /__standin__/ routes, rejected with HTTP 400."""


class WeChatStandinServer(ThreadingHTTPServer):
    """HTTP server that stores the stand-in's state: tokens, codes, calls, messages and scripts."""

    # Handler threads of slow codes must not keep the process alive or block server_close().
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        appid: str | None,
        secret: str | None,
        slow_delay_s: float,
        token_ttl_s: int = TOKEN_TTL_S,
        token_delay_s: float = 0.0,
    ):
        super().__init__(address, StandinRequestHandler)
        self.appid = appid
        self.secret = secret
        self.slow_delay_s = slow_delay_s
        self.token_ttl_s = token_ttl_s
        self.token_delay_s = token_delay_s
        self._lock = threading.Lock()
        self._token_expiry: dict[str, float] = {}  # access token -> time.monotonic() deadline
        self._used_codes: set[str] = set()
        self._calls: list[dict] = []
        self._subscribe_messages: list[dict] = []
        self._scripted_errcodes: dict[str, deque[int]] = {}
        self._unsubscribed: set[str] = set()

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._token_expiry[token] = time.monotonic() + self.token_ttl_s
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

    def script_errcodes(self, openid: str, errcodes: list[int]) -> None:
        """Queue errcodes for the next sends to openid, after any queued before."""
        with self._lock:
            self._scripted_errcodes.setdefault(openid, deque()).extend(errcodes)

    def unsubscribe(self, openid: str) -> None:
        with self._lock:
            self._unsubscribed.add(openid)

    def next_send_errcode(self, openid: str) -> int:
        """Return the errcode for a valid send to openid: the next scripted one, 43101 if unsubscribed, else 0."""
        with self._lock:
            queued = self._scripted_errcodes.get(openid)
            if queued:
                return queued.popleft()
            if openid in self._unsubscribed:
                return 43101
            return 0

    def record_subscribe_message(self, body: dict) -> None:
        with self._lock:
            self._subscribe_messages.append(body)

    def list_subscribe_messages(self) -> list[dict]:
        with self._lock:
            return list(self._subscribe_messages)

    def reset(self) -> None:
        with self._lock:
            self._token_expiry.clear()
            self._used_codes.clear()
            self._calls.clear()
            self._subscribe_messages.clear()
            self._scripted_errcodes.clear()
            self._unsubscribed.clear()


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


def _check_access_token(server: WeChatStandinServer, params: dict[str, str]) -> None:
    access_token = params.get("access_token")
    if not access_token:
        raise ApiError(41001, "access_token missing")
    if not server.is_token_valid(access_token):
        raise ApiError(40001, "invalid credential, access_token is invalid or not latest")


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
    if server.token_delay_s > 0:
        time.sleep(server.token_delay_s)
    return {"access_token": server.issue_token(), "expires_in": server.token_ttl_s}


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


def _check_subscribe_data(data: object) -> None:
    if not isinstance(data, dict) or not data:
        raise ApiError(47003, "argument invalid! data invalid")
    for key, item in data.items():
        kind = SUBSCRIBE_KEY_PATTERN.fullmatch(key)
        if kind is None:
            raise ApiError(47003, f"argument invalid! data.{key} invalid")
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, str) or not SUBSCRIBE_VALUE_PATTERNS[kind.group(1)].fullmatch(value):
            raise ApiError(47003, f"argument invalid! data.{key}.value invalid")


def handle_subscribe_send(server: WeChatStandinServer, body: dict) -> dict:
    touser = body.get("touser")
    if not isinstance(touser, str) or not touser:
        raise ApiError(40003, "invalid openid")
    template_id = body.get("template_id")
    if not isinstance(template_id, str) or not template_id:
        raise ApiError(40037, "invalid template_id")
    page = body.get("page")
    if page is not None and not isinstance(page, str):
        raise ApiError(41030, "invalid page")
    _check_subscribe_data(body.get("data"))

    errcode = server.next_send_errcode(touser)
    if errcode != 0:
        raise ApiError(errcode, SCRIPTED_ERRMSGS.get(errcode, f"scripted errcode {errcode}"))
    server.record_subscribe_message(body)
    return {"errcode": 0, "errmsg": "ok"}


def handle_msg_sec_check(server: WeChatStandinServer, body: dict) -> dict:
    # WeChat's examples send version as a number, and a string is accepted too.
    if str(body.get("version")) != "2":
        raise ApiError(47001, "data format error: the stand-in serves msgSecCheck version 2 only")
    scene = body.get("scene")
    if isinstance(scene, bool) or scene not in (1, 2, 3, 4):
        raise ApiError(47001, "data format error: scene must be 1, 2, 3 or 4")
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(47001, "data format error: content missing")
    openid = body.get("openid")
    if not isinstance(openid, str) or not openid:
        raise ApiError(40003, "invalid openid")

    if BUSY_MARKER in content:
        raise ApiError(-1, "system error")
    if SLOW_MARKER in content:
        time.sleep(server.slow_delay_s)

    if RISKY_WORD in content:
        suggest, label = "risky", LABEL_ILLEGAL
    elif REVIEW_WORD in content:
        suggest, label = "review", LABEL_OTHER
    else:
        suggest, label = "pass", LABEL_NORMAL
    return {
        "errcode": 0,
        "errmsg": "ok",
        "result": {"suggest": suggest, "label": label},
        "detail": [{"strategy": "content_model", "errcode": 0, "suggest": suggest, "label": label, "prob": 90}],
        "trace_id": secrets.token_hex(12),
    }


GET_API_HANDLERS = {
    TOKEN_PATH: handle_token,
    JSCODE2SESSION_PATH: handle_jscode2session,
}
POST_API_HANDLERS = {
    SUBSCRIBE_SEND_PATH: handle_subscribe_send,
    MSG_SEC_CHECK_PATH: handle_msg_sec_check,
}
GET_CONTROL_PATHS = (CALLS_PATH, SUBSCRIBE_MESSAGES_PATH)
POST_CONTROL_PATHS = (SCRIPT_PATH, UNSUBSCRIBE_PATH, RESET_PATH)


def _redact(params: dict[str, str]) -> dict[str, str]:
    return {name: REDACTED if name in REDACTED_PARAMS else value for name, value in params.items()}


def _query_params(query: str) -> dict[str, str]:
    # WeChat reads the first value of a repeated parameter.
    return {name: values[0] for name, values in parse_qs(query, keep_blank_values=True).items()}


def _parse_json_object(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _control_openid(body: dict | None) -> str:
    openid = body.get("openid") if body is not None else None
    if not isinstance(openid, str) or not openid:
        raise ControlError('the body must be a JSON object with a non-empty string "openid"')
    return openid


def _control_errcodes(body: dict) -> list[int]:
    errcodes = body.get("errcodes")
    valid = isinstance(errcodes, list) and errcodes and all(
        isinstance(errcode, int) and not isinstance(errcode, bool) for errcode in errcodes
    )
    if not valid:
        raise ControlError('"errcodes" must be a non-empty list of integers')
    return errcodes


class StandinRequestHandler(BaseHTTPRequestHandler):
    server: WeChatStandinServer
    server_version = "WeChatStandin/1.0"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == CALLS_PATH:
            logger.info("GET %s", url.path)
            self._send_json(200, self.server.list_calls())
            return
        if url.path == SUBSCRIBE_MESSAGES_PATH:
            logger.info("GET %s", url.path)
            self._send_json(200, self.server.list_subscribe_messages())
            return

        handler = GET_API_HANDLERS.get(url.path)
        if handler is None:
            self._reject_unknown(url.path)
            return

        params = _query_params(url.query)
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
        raw_body = self._read_body()
        if raw_body is None:
            return
        url = urlsplit(self.path)

        if url.path in POST_CONTROL_PATHS:
            self._handle_control(url.path, raw_body)
            return

        handler = POST_API_HANDLERS.get(url.path)
        if handler is None:
            self._reject_unknown(url.path)
            return

        params = _query_params(url.query)
        body = _parse_json_object(raw_body)
        try:
            _check_access_token(self.server, params)
            if body is None:
                raise ApiError(47001, "data format error")
            response = handler(self.server, body)
            errcode = 0
        except ApiError as error:
            response = error.to_body()
            errcode = error.errcode

        self.server.record_call(
            {"method": "POST", "path": url.path, "params": _redact(params), "body": body, "errcode": errcode}
        )
        # The body contains openids and user text, so the log line leaves it out.
        logger.info("POST %s errcode=%d", url.path, errcode)
        self._send_json(200, response)

    def _handle_control(self, path: str, raw_body: bytes) -> None:
        if path == RESET_PATH:
            self.server.reset()
            logger.info("POST %s", path)
            self._send_empty(204)
            return

        body = _parse_json_object(raw_body)
        try:
            openid = _control_openid(body)
            if path == SCRIPT_PATH:
                self.server.script_errcodes(openid, _control_errcodes(body))
            else:
                self.server.unsubscribe(openid)
        except ControlError as error:
            logger.info("POST %s status=400", path)
            self._send_json(400, {"error": str(error)})
            return
        logger.info("POST %s", path)
        self._send_empty(204)

    def _reject_unknown(self, path: str) -> None:
        known_paths = (*GET_API_HANDLERS, *POST_API_HANDLERS, *GET_CONTROL_PATHS, *POST_CONTROL_PATHS)
        status = 405 if path in known_paths else 404
        logger.info("%s %s status=%d", self.command, path, status)
        self._send_json(status, {"error": "method not allowed" if status == 405 else "not found"})

    def _read_body(self) -> bytes | None:
        """Read the request body, or respond 413 and return None when it exceeds MAX_BODY_BYTES."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY_BYTES:
            logger.info("%s %s status=413", self.command, self.path.split("?", 1)[0])
            self.close_connection = True
            self._send_json(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.end_headers()

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
    *,
    token_ttl_s: int = TOKEN_TTL_S,
    token_delay_s: float = 0.0,
) -> WeChatStandinServer:
    """Bind the stand-in (port 0 picks a free port) without starting to serve.

    Call serve_forever() on the result, for example in a daemon thread, and read the
    bound port from server_address. An appid or secret of None accepts any value.
    token_ttl_s is the expires_in of issued access tokens, and token_delay_s delays every
    token response, so tests can make several clients ask for a token at once.
    """
    return WeChatStandinServer(
        (host, port),
        appid=appid,
        secret=secret,
        slow_delay_s=slow_delay_s,
        token_ttl_s=token_ttl_s,
        token_delay_s=token_delay_s,
    )


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

    # Anyone who reaches the stand-in can log in as anyone, so a production host must never run it.
    if os.environ.get("APP_ENV") == "prod":
        print("wechat_standin: refusing to start with APP_ENV=prod; production uses WeChat's real API",
              file=sys.stderr)
        sys.exit(2)

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
