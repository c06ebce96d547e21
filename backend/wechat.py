"""Gateway to the WeChat server API: login codes, subscribe messages and text content checks.

wechatpy 1.8.18 is blocking, so each call runs in a worker thread under an overall
deadline and never blocks the event loop.

With settings.redis_url set, every process shares one access token through Redis. The token
is cached for less than WeChat's expires_in, so it is refreshed before WeChat expires it, and
only the process that holds a short Redis lock fetches a new one while the others wait for it.
Without Redis, each gateway keeps its own token in memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import requests
from redis.exceptions import RedisError
from wechatpy.client import WeChatClient
from wechatpy.client.api.base import BaseWeChatAPI
from wechatpy.exceptions import WeChatClientException
from wechatpy.session.memorystorage import MemoryStorage
from wechatpy.session.redisstorage import RedisStorage

from backend.errors import Forbidden, RateLimited, ServiceUnavailable, Unauthorized
from backend.settings import DEFAULT_WECHAT_API_BASE_URL, Settings

logger = logging.getLogger(__name__)

# WeChat calls get threads of their own: when WeChat stalls, calls waiting on it must not take
# the default executor's few threads (min(32, cores + 4)), which password hashing also needs.
WECHAT_THREADS = 32
_WECHAT_EXECUTOR = ThreadPoolExecutor(max_workers=WECHAT_THREADS, thread_name_prefix="wechat")

# errcodes of code2Session as listed at
# https://mp.weixin.qq.com/debug/wxadoc/dev/OpenApiDoc/user-login/code2Session.html.
# That list omits 40163, which WeChat returns for a code that was already used.
ERRCODE_INVALID_CODE = 40029
ERRCODE_CODE_USED = 40163
ERRCODE_MINUTE_QUOTA = 45011
# WeChat blocks the login of a user it rates high-risk; retrying cannot help.
ERRCODE_HIGH_RISK_USER = 40226
CODE_REJECTED_ERRCODES = frozenset({ERRCODE_INVALID_CODE, ERRCODE_CODE_USED})
# errcodes for an access token that is invalid (40001, 40014) or expired (42001).
ACCESS_TOKEN_ERRCODES = frozenset({40001, 40014, 42001})

# errcodes of subscribeMessage.send: -1 is "system busy" and 45009 the daily API quota,
# so both may succeed later. 43101 means the user has not accepted this template. An access
# token that WeChat rejects even after a refresh counts as retryable too.
ERRCODE_SYSTEM_BUSY = -1
ERRCODE_DAILY_QUOTA = 45009
ERRCODE_NOT_SUBSCRIBED = 43101
SEND_RETRYABLE_ERRCODES = frozenset({ERRCODE_SYSTEM_BUSY, ERRCODE_DAILY_QUOTA}) | ACCESS_TOKEN_ERRCODES

# msgSecCheck 2.0 scenes: 1 profile, 2 comment, 3 forum post, 4 social log.
CONTENT_CHECK_SCENES = frozenset({1, 2, 3, 4})
CONTENT_CHECK_SUGGESTIONS = frozenset({"pass", "review", "risky"})

ACCESS_TOKEN_DEFAULT_TTL_S = 7200
# A cached token is dropped this many seconds before WeChat's expires_in ends, so the next
# call fetches a new one while the old one still works.
ACCESS_TOKEN_REFRESH_MARGIN_S = 300
TOKEN_KEY_PREFIX = "linli:wechat"
# A token fetch is one HTTP request whose connect and read timeouts are wechat_timeout_s each.
# The refresh lock lives that long plus this margin, so a crashed holder blocks the others
# for a bounded time.
TOKEN_LOCK_MARGIN_S = 1.0
TOKEN_LOCK_POLL_S = 0.05
REDIS_TIMEOUT_S = 5.0
# Deletes the refresh lock only while it still holds this process's random value, so a holder
# whose lock expired cannot delete the lock that another process took after it.
RELEASE_LOCK_SCRIPT = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0
"""

# Seconds added to wechat_timeout_s for the overall deadline of one call. requests applies
# its timeout to each connect and each socket read, and one call may make two token fetches
# and two API requests, so only asyncio.wait_for bounds the total time.
DEADLINE_MARGIN_S = 1.0
# NOTE: a guessed upper bound. WeChat documents no maximum length for wx.login codes,
# and codes quoted in WeChat community posts have 32 to 64 characters.
MAX_CODE_LENGTH = 128
OPENID_VISIBLE_CHARS = 4


class WeChatCodeInvalid(Unauthorized):
    status = 401
    code = "wechat_code_invalid"
    message = "微信登录凭证无效或已过期，请关闭并重新打开小程序后再次登录。"


class WeChatRateLimited(RateLimited):
    status = 429
    code = "wechat_rate_limited"
    message = "登录请求过于频繁，请稍后再试。"
    # Sent as Retry-After. errcode 45011 ("api minute-quota reach limit") means a per-minute
    # call quota is used up, so it has renewed at the latest a minute later.
    retry_after_s = 60


class WeChatLoginBlocked(Forbidden):
    status = 403
    code = "wechat_login_blocked"
    message = "微信暂时限制了该账号登录小程序，请在微信中完成安全验证后再试。"


class WeChatUnavailable(ServiceUnavailable):
    status = 503
    code = "wechat_unavailable"
    message = "微信服务暂时不可用，请稍后再试。"


class WeChatSendError(Exception):
    """A subscribe message that WeChat did not accept.

    errcode is WeChat's error code, or None when no response came from WeChat (timeout,
    network error, no access token).
    """

    def __init__(self, errcode: int | None, errmsg: str | None = None):
        super().__init__(f"errcode={errcode} errmsg={errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class WeChatSendRetryable(WeChatSendError):
    """The send failed for a reason that may pass: errcode -1 or 45009, a timeout, or no access token."""


class WeChatUserNotSubscribed(WeChatSendError):
    """The user has not subscribed to the template (errcode 43101); resending cannot help."""


class WeChatSendRejected(WeChatSendError):
    """WeChat rejected the message itself (bad openid, template or data); resending cannot help."""


class AccessTokenError(WeChatClientException):
    """The token request returned an error body or a body without a token."""


class AccessTokenWaitTimeout(Exception):
    """Another process held the token refresh lock, and no new token appeared before the wait ended."""


@dataclass(frozen=True)
class WeChatSession:
    """Result of code2Session. The session_key decrypts user data and must never be logged."""

    openid: str
    session_key: str = field(repr=False)
    unionid: str | None = None


def mask_openid(openid: str | None) -> str:
    """Shorten an openid for logs to its first and last characters, such as "oAbC***wXyZ"."""
    if not openid:
        return "-"
    if len(openid) <= 2 * OPENID_VISIBLE_CHARS:
        return "***"
    return f"{openid[:OPENID_VISIBLE_CHARS]}***{openid[-OPENID_VISIBLE_CHARS:]}"


def _parse_errcode(raw: object) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _cache_ttl_s(expires_in: int) -> int:
    """Seconds to cache a token: expires_in less the refresh margin, or half of a short expires_in."""
    if expires_in > 2 * ACCESS_TOKEN_REFRESH_MARGIN_S:
        return expires_in - ACCESS_TOKEN_REFRESH_MARGIN_S
    return max(1, expires_in // 2)


class _WeChatClient(WeChatClient):
    """WeChatClient that sends every call to one base URL with a timeout, and shares its token.

    token_store is a synchronous Redis client, used only in the gateway's worker threads. With
    None, the token stays in this client's memory.
    """

    def __init__(
        self,
        *,
        appid: str,
        secret: str,
        api_base_url: str,
        timeout_s: float,
        token_store: redis.Redis | None = None,
    ):
        storage = MemoryStorage() if token_store is None else RedisStorage(token_store, prefix=TOKEN_KEY_PREFIX)
        # wechatpy's auto_retry refetches the token and retries without any limit, so the
        # gateway retries once itself.
        super().__init__(appid, secret, session=storage, timeout=timeout_s, auto_retry=False)
        self.api_base_url = api_base_url
        self._token_url = f"{api_base_url}cgi-bin/token"
        self._token_store = token_store
        self._lock_key = f"{TOKEN_KEY_PREFIX}:{self.access_token_key}:lock"
        self._lock_ttl_ms = int((2 * timeout_s + TOKEN_LOCK_MARGIN_S) * 1000)
        self._release_lock = token_store.register_script(RELEASE_LOCK_SCRIPT) if token_store is not None else None
        self._memory_lock = threading.Lock()
        self._memory_expires_at = 0.0  # time.monotonic() deadline of the token in MemoryStorage
        self._thread_state = threading.local()

        # Instance attributes shadow wechatpy's class constants, so other WeChatClient
        # instances in the process keep the default host.
        self.API_BASE_URL = f"{api_base_url}cgi-bin/"
        for endpoint in vars(self).values():
            default_base = getattr(endpoint, "API_BASE_URL", "")
            if isinstance(endpoint, BaseWeChatAPI) and default_base.startswith(DEFAULT_WECHAT_API_BASE_URL):
                endpoint.API_BASE_URL = api_base_url + default_base[len(DEFAULT_WECHAT_API_BASE_URL) :]
        # NOTE: a few wechatpy methods (customservice, media download, semantic) build absolute
        # api.weixin.qq.com URLs in their bodies and still go there. The methods the gateway
        # calls do not.

    @property
    def access_token(self) -> str:
        """The cached token, fetched first when none is cached. wechatpy reads it once per request."""
        token = self._read_cached_token()
        if token is None:
            token = self.refresh_access_token()
        self._thread_state.last_token = token
        return token

    def last_token(self) -> str | None:
        """Return the token that the latest request in this thread sent."""
        return getattr(self._thread_state, "last_token", None)

    def refresh_access_token(self, stale_token: str | None = None) -> str:
        """Return a cached token other than stale_token, fetching a new one only when there is none.

        With Redis, the fetch happens under a lock and after a second read of the cache, so of
        several processes that find no token only one fetches it. Raises AccessTokenError,
        AccessTokenWaitTimeout, RedisError or requests.RequestException.
        """
        if self._token_store is None:
            with self._memory_lock:
                return self._reuse_or_fetch(stale_token)

        lock_id = secrets.token_hex(16)
        deadline = time.monotonic() + self._lock_ttl_ms / 1000 + TOKEN_LOCK_POLL_S
        while True:
            if self._token_store.set(self._lock_key, lock_id, nx=True, px=self._lock_ttl_ms):
                try:
                    # Another process may have stored a token between our read and the lock.
                    return self._reuse_or_fetch(stale_token)
                finally:
                    self._release_refresh_lock(lock_id)

            token = self._read_cached_token()
            if token is not None and token != stale_token:
                return token
            if time.monotonic() >= deadline:
                raise AccessTokenWaitTimeout(f"no access token after waiting {self._lock_ttl_ms} ms for the refresh lock")
            time.sleep(TOKEN_LOCK_POLL_S)

    def fetch_access_token(self) -> dict:
        """Fetch an access token from the configured base URL and cache it.

        This replaces wechatpy's _fetch_access_token, which sends no timeout and caches the
        token for the whole expires_in. Raises requests.RequestException on network and HTTP
        errors and AccessTokenError on an error body or a body without an access_token.
        """
        logger.debug("fetching a WeChat access token: appid=%s", self.appid)
        response = self._http.get(
            self._token_url,
            params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
            timeout=self.timeout,
        )
        response.raise_for_status()
        try:
            result = response.json()
        except ValueError:
            raise AccessTokenError(None, "token response is not JSON", client=self) from None
        if not isinstance(result, dict):
            raise AccessTokenError(None, "token response is not a JSON object", client=self)

        errcode = _parse_errcode(result.get("errcode", 0))
        if errcode != 0:
            raise AccessTokenError(errcode, result.get("errmsg"), client=self)
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            raise AccessTokenError(None, "token response has no access_token", client=self)

        expires_in = result.get("expires_in")
        if not isinstance(expires_in, int) or expires_in <= 0:
            expires_in = ACCESS_TOKEN_DEFAULT_TTL_S
        cache_ttl_s = _cache_ttl_s(expires_in)
        # RedisStorage applies the TTL. MemoryStorage ignores it, so the deadline is kept here.
        self.session.set(self.access_token_key, token, cache_ttl_s)
        self._memory_expires_at = time.monotonic() + cache_ttl_s
        self.expires_at = int(time.time()) + expires_in
        return result

    def _reuse_or_fetch(self, stale_token: str | None) -> str:
        token = self._read_cached_token()
        if token is not None and token != stale_token:
            return token
        return self.fetch_access_token()["access_token"]

    def _read_cached_token(self) -> str | None:
        token = self.session.get(self.access_token_key)
        if not isinstance(token, str) or not token:
            return None
        if self._token_store is None and time.monotonic() >= self._memory_expires_at:
            return None
        return token

    def _release_refresh_lock(self, lock_id: str) -> None:
        try:
            self._release_lock(keys=[self._lock_key], args=[lock_id])
        except RedisError as error:
            logger.warning(
                "could not release the WeChat token refresh lock, it expires in %d ms: %s appid=%s",
                self._lock_ttl_ms,
                type(error).__name__,
                self.appid,
            )


class _CallFailed(Exception):
    """A gateway call that failed; internal to this module.

    stage is "api" when the API returned an errcode (not logged yet, because the public
    method knows how serious it is), "token" when no access token could be had and "transport"
    for timeouts and network errors. Failures of the last two stages are logged in _call.
    """

    def __init__(self, stage: str, errcode: int | None = None, errmsg: object = None):
        super().__init__(f"{stage} errcode={errcode}")
        self.stage = stage
        self.errcode = errcode
        self.errmsg = errmsg


class WeChatGateway:
    """Client of the WeChat server API for one mini-program (settings.wechat_appid)."""

    def __init__(self, settings: Settings):
        self._appid = settings.wechat_appid
        self._timeout_s = settings.wechat_timeout_s
        self._token_store: redis.Redis | None = None
        if settings.redis_url:
            self._token_store = redis.Redis.from_url(
                settings.redis_url,
                decode_responses=True,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
        # NOTE: the secret travels in the query string, as WeChat requires, and urllib3 logs
        # full request URLs at DEBUG level. Keep the "urllib3" logger at INFO or above.
        self._client = _WeChatClient(
            appid=settings.wechat_appid,
            secret=settings.wechat_secret,
            api_base_url=settings.wechat_api_base_url,
            timeout_s=settings.wechat_timeout_s,
            token_store=self._token_store,
        )

    async def code_to_session(self, code: str) -> WeChatSession:
        """Exchange a wx.login code for the user's openid and session_key.

        Raises WeChatCodeInvalid when the code is empty, longer than MAX_CODE_LENGTH, or
        rejected by WeChat as invalid or already used. Raises WeChatRateLimited on errcode
        45011 and WeChatUnavailable on any other failure, timeouts included.
        """
        if not code or len(code) > MAX_CODE_LENGTH:
            logger.info(
                "WeChat login code rejected without calling WeChat: length=%d (max %d) appid=%s",
                len(code),
                MAX_CODE_LENGTH,
                self._appid,
            )
            raise WeChatCodeInvalid()

        try:
            result = await self._call("code2Session", self._client.wxa.code_to_session, code)
        except _CallFailed as failure:
            raise self._login_error(failure) from None
        return self._parse_session(result)

    async def send_subscribe_message(
        self, openid: str, template_id: str, data: dict, page: str | None = None
    ) -> None:
        """Send a subscribe message, with data such as {"thing1": {"value": "..."}}.

        Raises WeChatSendRetryable for errcodes -1 and 45009, timeouts, network errors, a
        missing access token and one that WeChat rejects even after a refresh. Raises
        WeChatUserNotSubscribed for errcode 43101 and WeChatSendRejected for any other errcode.
        """
        try:
            result = await self._call(
                "subscribeMessage.send", self._client.wxa.send_subscribe_message, openid, template_id, data, page
            )
        except _CallFailed as failure:
            raise self._send_error(failure, openid, template_id) from None

        if not isinstance(result, dict):
            logger.warning("WeChat subscribeMessage.send response is not a JSON object: appid=%s", self._appid)
            raise WeChatSendRetryable(None, "response is not a JSON object")

    async def check_text(self, content: str, openid: str, scene: int) -> str:
        """Check user text with msgSecCheck 2.0 and return its suggestion: "pass", "review" or "risky".

        scene is one of CONTENT_CHECK_SCENES. Raises WeChatUnavailable on any failure: an
        errcode, a timeout, a network error or a response without a known suggestion.
        """
        if scene not in CONTENT_CHECK_SCENES:
            raise ValueError(f"scene must be one of {sorted(CONTENT_CHECK_SCENES)}, got {scene!r}")
        if not content:
            raise ValueError("content must not be empty")

        body = {"content": content, "version": 2, "scene": scene, "openid": openid}
        try:
            result = await self._call("msgSecCheck", self._post_msg_sec_check, body)
        except _CallFailed as failure:
            if failure.stage == "api":
                logger.warning(
                    "WeChat msgSecCheck failed: errcode=%s errmsg=%s openid=%s appid=%s",
                    failure.errcode,
                    failure.errmsg,
                    mask_openid(openid),
                    self._appid,
                )
            raise WeChatUnavailable() from None

        verdict = result.get("result") if isinstance(result, dict) else None
        suggest = verdict.get("suggest") if isinstance(verdict, dict) else None
        if suggest not in CONTENT_CHECK_SUGGESTIONS:
            logger.warning("WeChat msgSecCheck response has no known result.suggest: appid=%s", self._appid)
            raise WeChatUnavailable()
        return suggest

    def close(self) -> None:
        """Close the pooled HTTP and Redis connections."""
        self._client._http.close()
        if self._token_store is not None:
            self._token_store.close()

    async def _call(self, api_name: str, function: Callable[..., object], *args: object) -> object:
        """Run function(*args) in a worker thread under the overall deadline; raise _CallFailed on failure.

        The exceptions caught here carry the request URL, with the secret or access token in
        it, so _CallFailed is raised after the except blocks and chains none of them.
        """
        deadline_s = self._timeout_s + DEADLINE_MARGIN_S
        try:
            loop = asyncio.get_running_loop()
            call = functools.partial(self._call_with_fresh_token, function, *args)
            return await asyncio.wait_for(loop.run_in_executor(_WECHAT_EXECUTOR, call), timeout=deadline_s)
        except TimeoutError:
            # A worker thread cannot be cancelled, so it runs until its HTTP call ends and its result is dropped.
            logger.warning("WeChat %s timed out after %.1f s: appid=%s", api_name, deadline_s, self._appid)
            failure = _CallFailed("transport")
        except AccessTokenError as error:
            logger.warning(
                "WeChat access token request failed: errcode=%s errmsg=%s appid=%s",
                error.errcode,
                error.errmsg,
                self._appid,
            )
            failure = _CallFailed("token", _parse_errcode(error.errcode), error.errmsg)
        except WeChatClientException as error:
            failure = _CallFailed("api", _parse_errcode(error.errcode), error.errmsg)
        except requests.RequestException as error:
            # str(error) often contains the URL and with it the secret, so only the type is logged.
            logger.warning("WeChat %s failed: %s appid=%s", api_name, type(error).__name__, self._appid)
            failure = _CallFailed("transport")
        except RedisError as error:
            logger.warning(
                "Redis failed while reading the WeChat access token for %s: %s appid=%s",
                api_name,
                type(error).__name__,
                self._appid,
            )
            failure = _CallFailed("token")
        except AccessTokenWaitTimeout:
            logger.warning(
                "WeChat %s gave up waiting for another process to refresh the access token: appid=%s",
                api_name,
                self._appid,
            )
            failure = _CallFailed("token")
        raise failure

    def _call_with_fresh_token(self, function: Callable[..., object], *args: object) -> object:
        """Call function in a worker thread, and once more with a new token if WeChat rejects the token."""
        try:
            return function(*args)
        except AccessTokenError:
            raise
        except WeChatClientException as error:
            if _parse_errcode(error.errcode) not in ACCESS_TOKEN_ERRCODES:
                raise

        # A token fetched elsewhere for the same appid invalidates ours five minutes later,
        # according to WeChat's "Get access token" documentation, so a cached token may be
        # invalid before expires_in. A process that already refreshed it leaves a new token
        # in the cache, and refresh_access_token returns that one without a fetch.
        logger.info("WeChat rejected the cached access token, refreshing it: appid=%s", self._appid)
        self._client.refresh_access_token(stale_token=self._client.last_token())
        return function(*args)

    def _post_msg_sec_check(self, body: dict) -> object:
        return self._client.post("wxa/msg_sec_check", data=body, api_base_url=self._client.api_base_url)

    def _login_error(self, failure: _CallFailed) -> WeChatCodeInvalid | WeChatLoginBlocked | WeChatRateLimited | WeChatUnavailable:
        """Log an API error of code2Session and return the domain error to raise for it."""
        if failure.stage != "api":
            return WeChatUnavailable()

        errcode = failure.errcode
        if errcode in CODE_REJECTED_ERRCODES:
            logger.info("WeChat rejected a login code: errcode=%s appid=%s", errcode, self._appid)
            return WeChatCodeInvalid()
        if errcode == ERRCODE_HIGH_RISK_USER:
            logger.info("WeChat blocked a high-risk user's login: errcode=%s appid=%s", errcode, self._appid)
            return WeChatLoginBlocked()
        if errcode == ERRCODE_MINUTE_QUOTA:
            logger.warning("WeChat code2Session rate limited: errcode=%s appid=%s", errcode, self._appid)
            return WeChatRateLimited()
        logger.warning(
            "WeChat code2Session failed: errcode=%s errmsg=%s appid=%s", errcode, failure.errmsg, self._appid
        )
        return WeChatUnavailable()

    def _send_error(self, failure: _CallFailed, openid: str, template_id: str) -> WeChatSendError:
        """Log an API error of subscribeMessage.send and return the WeChatSendError to raise for it."""
        errmsg = None if failure.errmsg is None else str(failure.errmsg)
        if failure.stage != "api":
            return WeChatSendRetryable(failure.errcode, errmsg)

        errcode = failure.errcode
        context = (errcode, errmsg, mask_openid(openid), template_id, self._appid)
        if errcode == ERRCODE_NOT_SUBSCRIBED:
            logger.info(
                "WeChat subscribeMessage.send: user not subscribed: errcode=%s errmsg=%s openid=%s template_id=%s appid=%s",
                *context,
            )
            return WeChatUserNotSubscribed(errcode, errmsg)
        if errcode in SEND_RETRYABLE_ERRCODES:
            logger.warning(
                "WeChat subscribeMessage.send failed, retryable: errcode=%s errmsg=%s openid=%s template_id=%s appid=%s",
                *context,
            )
            return WeChatSendRetryable(errcode, errmsg)
        logger.warning(
            "WeChat subscribeMessage.send rejected: errcode=%s errmsg=%s openid=%s template_id=%s appid=%s",
            *context,
        )
        return WeChatSendRejected(errcode, errmsg)

    def _parse_session(self, result: object) -> WeChatSession:
        # wechatpy returns the raw requests.Response when the body is not JSON.
        if not isinstance(result, dict):
            logger.warning("WeChat code2Session response is not a JSON object: appid=%s", self._appid)
            raise WeChatUnavailable()

        openid = result.get("openid")
        session_key = result.get("session_key")
        if not isinstance(openid, str) or not openid or not isinstance(session_key, str) or not session_key:
            logger.warning("WeChat code2Session response lacks openid or session_key: appid=%s", self._appid)
            raise WeChatUnavailable()

        unionid = result.get("unionid")
        return WeChatSession(
            openid=openid,
            session_key=session_key,
            unionid=unionid if isinstance(unionid, str) and unionid else None,
        )
