"""Keyset paging of list endpoints: a page of items and the cursor of the page after it.

A cursor names the last item a client has seen, never an offset, so rows that change state or
arrive while a reviewer pages cannot shift later rows past the reviewer unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from backend.errors import ValidationError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Ids are 32-bit database keys, so a cursor id has at most 10 digits.
_MAX_ID_DIGITS = 10
MAX_ID = 2**31 - 1

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """Items of one page, and the cursor that continues after them (None on the last page)."""

    items: list[T]
    next_cursor: str | None


def parse_limit(raw: str | None) -> int:
    """Parse the `limit` query value: DEFAULT_PAGE_SIZE when absent, else 1 to MAX_PAGE_SIZE."""
    if raw is None:
        return DEFAULT_PAGE_SIZE
    # The length check comes first: int() of more than 4,300 digits raises ValueError.
    too_long = len(raw) > len(str(MAX_PAGE_SIZE))
    if too_long or not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise ValidationError(f"每页条数需为 1 到 {MAX_PAGE_SIZE} 之间的整数。", field="limit")
    return int(raw)


def parse_id_cursor(raw: str | None) -> int | None:
    """Parse a cursor that is the id of the last item seen. None means the first page."""
    if raw is None:
        return None
    return parse_id(raw)


def parse_id(raw: str) -> int:
    """Parse a cursor id, or raise ValidationError on the `cursor` field."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_ID_DIGITS or not 1 <= int(raw) <= MAX_ID:
        raise invalid_cursor()
    return int(raw)


def invalid_cursor() -> ValidationError:
    return ValidationError("翻页位置无效，请从第一页重新加载。", field="cursor")


def page_of(rows: list[T], limit: int, cursor_after: Callable[[T], str]) -> Page[T]:
    """Cut `rows`, fetched with `limit + 1`, to one page. The extra row only shows that a next page exists."""
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=cursor_after(items[-1]))
