"""Reading JSON bodies and query strings into plain values, with field-level errors."""

from __future__ import annotations

from sanic import Request
from sanic.exceptions import BadRequest

from backend import paging
from backend.errors import NotFound, ValidationError

MAX_ID = 2**31 - 1  # the database's integer primary keys


# JSON integers beyond this are no ids, counts or coordinates of ours; the database's integer
# columns overflow past 2**31 and Python's float() past about 10**308.
MAX_JSON_INTEGER = 2**53
MAX_JSON_DEPTH = 8


def _check_values(value: object, path: str, depth: int = 0) -> None:
    """Reject text no database column can store and numbers no field of ours can take.

    A NUL or an unpaired UTF-16 surrogate (half of an emoji, as a cut JavaScript string leaves
    it) would otherwise fail inside PostgreSQL, and the driver's error repeats the text.
    """
    if depth > MAX_JSON_DEPTH:
        raise ValidationError("请求内容嵌套过深。", field=path or None, code="invalid_json")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationError("内容中包含无法保存的字符，请删除后重试。", field=path or None, code="invalid_text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(
                "内容中包含不完整的表情或字符，请删除后重试。", field=path or None, code="invalid_text"
            ) from None
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if abs(value) > MAX_JSON_INTEGER:
            raise ValidationError("数值超出允许范围。", field=path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, path, depth + 1)
            _check_values(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, path, depth + 1)


def json_body(request: Request) -> dict:
    try:
        body = request.json
    except BadRequest:
        raise ValidationError("请求内容不是有效的 JSON。", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ValidationError("请求内容需为 JSON 对象。", code="invalid_json")
    _check_values(body, "")
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


def page_query(request: Request) -> dict:
    """Read the `cursor` and `limit` query values of a list endpoint, as keyword arguments."""
    return {"cursor": request.args.get("cursor"), "limit": paging.parse_limit(request.args.get("limit"))}
