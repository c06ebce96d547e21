"""Domain errors: each carries an HTTP status, a stable English code and a Chinese message."""

from __future__ import annotations


class DomainError(Exception):
    status = 400
    code = "bad_request"
    message = "请求有误，请检查后重试。"

    def __init__(self, message: str | None = None, *, field: str | None = None, code: str | None = None):
        super().__init__(message or self.message)
        if message:
            self.message = message
        if code:
            self.code = code
        self.field = field

    def to_envelope(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}


class ValidationError(DomainError):
    status = 400
    code = "invalid_input"
    message = "填写的内容有误，请检查后重试。"


class OutsideServiceArea(DomainError):
    status = 400
    code = "outside_service_area"
    message = "该位置不在厦门市服务范围内，请确认地址后重试。"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"
    message = "登录已失效，请重新登录。"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"
    message = "您没有权限进行此操作。"


class NotFound(DomainError):
    status = 404
    code = "not_found"
    message = "找不到该内容，可能已被删除。"


class Conflict(DomainError):
    status = 409
    code = "conflict"
    message = "当前状态下无法进行此操作，请刷新后重试。"


class RateLimited(DomainError):
    status = 429
    code = "rate_limited"
    message = "操作太频繁，请稍后再试。"


class ServiceUnavailable(DomainError):
    status = 503
    code = "service_unavailable"
    message = "服务暂时不可用，请稍后再试。"
