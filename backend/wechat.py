"""Gateway to the WeChat server API: exchanges wx.login codes for sessions.

wechatpy 1.8.18 is blocking, so each call runs in a worker thread under an overall
deadline and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import requests
from wechatpy.client import WeChatClient
from wechatpy.client.api.base import BaseWeChatAPI
from wechatpy.exceptions import WeChatClientException

from backend.errors import Forbidden, RateLimited, ServiceUnavailable, Unauthorized
from backend.settings import DEFAULT_WECHAT_API_BASE_URL, Settings

logger = logging.getLogger(__name__)

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

ACCESS_TOKEN_DEFAULT_TTL_S = 7200
# Seconds added to wechat_timeout_s for the overall deadline of one login. requests applies
# its timeout to each connect and each socket read, and one login may make two token fetches
# and two code2Session calls, so only asyncio.wait_for bounds the total time.
DEADLINE_MARGIN_S = 1.0
# NOTE: a guessed upper bound. WeChat documents no maximum length for wx.login codes,
# and codes quoted in WeChat community posts have 32 to 64 characters.
MAX_CODE_LENGTH = 128


class WeChatCodeInvalid(Unauthorized):
    status = 401
    code = "wechat_code_invalid"
    message = "微信登录凭证无效或已过期，请关闭并重新打开小程序后再次登录。"


class WeChatRateLimited(RateLimited):
    status = 429
    code = "wechat_rate_limited"
    message = "登录请求过于频繁，请稍后再试。"


class WeChatLoginBlocked(Forbidden):
    status = 403
    code = "wechat_login_blocked"
    message = "微信暂时限制了该账号登录小程序，请在微信中完成安全验证后再试。"


class WeChatUnavailable(ServiceUnavailable):
    status = 503
    code = "wechat_unavailable"
    message = "微信服务暂时不可用，请稍后再试。"


@dataclass(frozen=True)
class WeChatSession:
    """Result of code2Session. The session_key decrypts user data and must never be logged."""

    openid: str
    session_key: str = field(repr=False)
    unionid: str | None = None


class _WeChatClient(WeChatClient):
    """WeChatClient that sends every call, the token fetch included, to one base URL with a timeout."""

    def __init__(self, *, appid: str, secret: str, api_base_url: str, timeout_s: float):
        # wechatpy's auto_retry refetches the token and retries without any limit, so the
        # gateway retries once itself.
        super().__init__(appid, secret, timeout=timeout_s, auto_retry=False)
        self._token_url = f"{api_base_url}cgi-bin/token"

        # Instance attributes shadow wechatpy's class constants, so other WeChatClient
        # instances in the process keep the default host.
        self.API_BASE_URL = f"{api_base_url}cgi-bin/"
        for endpoint in vars(self).values():
            default_base = getattr(endpoint, "API_BASE_URL", "")
            if isinstance(endpoint, BaseWeChatAPI) and default_base.startswith(DEFAULT_WECHAT_API_BASE_URL):
                endpoint.API_BASE_URL = api_base_url + default_base[len(DEFAULT_WECHAT_API_BASE_URL) :]
        # NOTE: a few wechatpy methods (customservice, media download, semantic) build absolute
        # api.weixin.qq.com URLs in their bodies and still go there. code2Session does not.

    def fetch_access_token(self) -> dict:
        """Fetch an access token from the configured base URL and cache it in self.session.

        This replaces wechatpy's _fetch_access_token, which sends no timeout. Raises
        requests.RequestException on network and HTTP errors and WeChatClientException
        on an error body or a body without an access_token.
        """
        response = self._http.get(
            self._token_url,
            params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
            timeout=self.timeout,
        )
        response.raise_for_status()
        try:
            result = response.json()
        except ValueError:
            raise WeChatClientException(None, "token response is not JSON", client=self) from None
        if not isinstance(result, dict):
            raise WeChatClientException(None, "token response is not a JSON object", client=self)

        errcode = _parse_errcode(result.get("errcode", 0))
        if errcode != 0:
            raise WeChatClientException(errcode, result.get("errmsg"), client=self)
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            raise WeChatClientException(None, "token response has no access_token", client=self)

        expires_in = result.get("expires_in")
        if not isinstance(expires_in, int) or expires_in <= 0:
            expires_in = ACCESS_TOKEN_DEFAULT_TTL_S
        self.session.set(self.access_token_key, token, expires_in)
        self.expires_at = int(time.time()) + expires_in
        return result


def _parse_errcode(raw: object) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


class WeChatGateway:
    """Client of the WeChat server API for one mini-program (settings.wechat_appid)."""

    def __init__(self, settings: Settings):
        self._appid = settings.wechat_appid
        self._timeout_s = settings.wechat_timeout_s
        # NOTE: the secret travels in the query string, as WeChat requires, and urllib3 logs
        # full request URLs at DEBUG level. Keep the "urllib3" logger at INFO or above.
        self._client = _WeChatClient(
            appid=settings.wechat_appid,
            secret=settings.wechat_secret,
            api_base_url=settings.wechat_api_base_url,
            timeout_s=settings.wechat_timeout_s,
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

        deadline_s = self._timeout_s + DEADLINE_MARGIN_S
        try:
            result = await asyncio.wait_for(asyncio.to_thread(self._exchange_code, code), timeout=deadline_s)
        except TimeoutError:
            # A worker thread cannot be cancelled, so it runs until its HTTP call ends and its result is dropped.
            logger.warning("WeChat code2Session timed out after %.1f s: appid=%s", deadline_s, self._appid)
            raise WeChatUnavailable() from None
        except WeChatClientException as error:
            # "from None" keeps the request, whose URL contains the secret, out of tracebacks.
            raise self._log_api_error(error) from None
        except requests.RequestException as error:
            # str(error) often contains the URL and with it the secret, so only the type is logged.
            logger.warning("WeChat code2Session failed: %s appid=%s", type(error).__name__, self._appid)
            raise WeChatUnavailable() from None

        return self._parse_session(result)

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._client._http.close()

    def _exchange_code(self, code: str) -> object:
        """Call code2Session in a worker thread, fetching a new access token once if needed."""
        try:
            return self._client.wxa.code_to_session(code)
        except WeChatClientException as error:
            if error.errcode not in ACCESS_TOKEN_ERRCODES:
                raise

        # wechatpy sends the cached access token with every call. A token fetched elsewhere for
        # the same appid invalidates ours five minutes later, according to WeChat's "Get
        # access token" documentation, so the cached one may be invalid before expires_in.
        logger.info("WeChat rejected the cached access token, fetching a new one: appid=%s", self._appid)
        self._client.fetch_access_token()
        return self._client.wxa.code_to_session(code)

    def _log_api_error(self, error: WeChatClientException) -> WeChatCodeInvalid | WeChatLoginBlocked | WeChatRateLimited | WeChatUnavailable:
        """Log an API error and return the domain error to raise for it."""
        errcode = _parse_errcode(error.errcode)
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
            "WeChat code2Session failed: errcode=%s errmsg=%s appid=%s", errcode, error.errmsg, self._appid
        )
        return WeChatUnavailable()

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
