"""Reading JSON bodies into plain values, with field-level errors."""

from __future__ import annotations

from sanic import Request
from sanic.exceptions import BadRequest

from backend.errors import NotFound, ValidationError

MAX_ID = 2**31 - 1  # the database's integer primary keys


def json_body(request: Request) -> dict:
    try:
        body = request.json
    except BadRequest:
        raise ValidationError("请求内容不是有效的 JSON。", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ValidationError("请求内容需为 JSON 对象。", code="invalid_json")
    return body


def required(body: dict, name: str, kind: type | tuple[type, ...], label: str):
    value = body.get(name)
    if value is None:
        raise ValidationError(f"缺少{label}。", field=name, code="missing_field")
    if isinstance(value, bool) and kind is not bool:
        raise ValidationError(f"{label}格式不正确。", field=name)
    if not isinstance(value, kind):
        raise ValidationError(f"{label}格式不正确。", field=name)
    return value


def path_id(raw: str, label: str = "编号") -> int:
    """Parse an id from the path; a malformed or out-of-range id is an unknown one (404)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10 or int(raw) > MAX_ID:
        raise NotFound(f"找不到该{label}。")
    return int(raw)
