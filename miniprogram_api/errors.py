"""One handler that renders every error as {"error": {"code", "message", "field"?}}."""

from __future__ import annotations

import asyncio
import logging

from sanic import Request
from sanic.exceptions import RequestCancelled, SanicException
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, json
from redis.exceptions import RedisError
from tortoise.exceptions import DBConnectionError, OperationalError

from backend.errors import DomainError

log = logging.getLogger(__name__)

# The status nginx uses for a request that its client closed. No client reads the response,
# but access logs and metrics can then tell disconnects apart from server errors.
CLIENT_CLOSED_REQUEST = 499

# Sanic's own errors (unknown route, wrong method, bad JSON, oversized body) get stable codes
# and Chinese messages here.
_SANIC_ERRORS = {
    400: ("bad_request", "请求格式有误，请检查后重试。"),
    401: ("unauthorized", "登录已失效，请重新登录。"),
    403: ("forbidden", "您没有权限进行此操作。"),
    404: ("not_found", "找不到该页面或内容。"),
    405: ("method_not_allowed", "不支持该请求方式。"),
    408: ("request_timeout", "请求超时，请检查网络后重试。"),
    413: ("payload_too_large", "提交的内容过大，请精简后重试。"),
    503: ("service_unavailable", "服务暂时不可用，请稍后再试。"),
}


def envelope(status: int, code: str, message: str, field: str | None = None) -> HTTPResponse:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return json({"error": error}, status=status)


class EnvelopeErrorHandler(ErrorHandler):
    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if isinstance(exception, DomainError):
            response = json(exception.to_envelope(), status=exception.status)
            retry_after = getattr(exception, "retry_after_s", None)
            if retry_after:
                response.headers["Retry-After"] = str(retry_after)
            return response

        if isinstance(exception, SanicException):
            status = exception.status_code or 500
            if status < 500 or status in _SANIC_ERRORS:
                code, message = _SANIC_ERRORS.get(status, ("bad_request", "请求有误，请检查后重试。"))
                response = envelope(status, code, message)
                for name, value in (exception.headers or {}).items():
                    response.headers[name] = value
                return response

        request_id = getattr(request.ctx, "request_id", "-") if request else "-"
        if isinstance(exception, asyncio.CancelledError):
            return _cancelled(request, request_id, exception)
        if isinstance(exception, (RedisError, DBConnectionError, OperationalError)):
            # A backing server is down or overloaded: the client may retry, nothing was lost.
            # Only the class is logged, because a driver's message can quote the values sent.
            log.error(
                "backing service failed request_id=%s path=%s error=%s",
                request_id, request.path if request else "-", type(exception).__name__,
            )
            return envelope(503, "service_unavailable", "服务暂时不可用，请稍后再试。")
        log.exception("unhandled error request_id=%s path=%s", request_id, request.path if request else "-")
        return envelope(500, "internal_error", "系统出错了，请稍后再试；如持续出现请联系客服。")


def _cancelled(request: Request | None, request_id: str, exception: asyncio.CancelledError) -> HTTPResponse:
    """Log a cancelled handler without a traceback, because the cancel is no failure of ours.

    Sanic passes RequestCancelled to the error handler when the client hangs up, and a plain
    CancelledError when the server stops with the handler still running.
    """
    path = request.path if request else "-"
    if isinstance(exception, RequestCancelled):
        log.info("client disconnected before the response request_id=%s path=%s", request_id, path)
        return envelope(CLIENT_CLOSED_REQUEST, "client_closed_request", "请求已取消。")
    log.warning("request cancelled while the server stops request_id=%s path=%s", request_id, path)
    return envelope(503, "service_unavailable", "服务暂时不可用，请稍后再试。")
