"""Screening of user text with WeChat's msgSecCheck, and the flags that officers review.

screen() runs before the text is saved: "risky" text is rejected, and text that WeChat
sends to review, or that could not be checked, is saved and then flagged with flag().
"""

from __future__ import annotations

import logging

from backend import clock, paging
from backend.errors import NotFound, ValidationError
from backend.models import ContentFlag, Rating, ServiceRequest, User
from backend.paging import Page
from backend.wechat import WeChatUnavailable

log = logging.getLogger(__name__)

# msgSecCheck 2.0 scenes. Rating comments are comments; the other texts (request
# descriptions, service summaries) are posts that others read, closest to the forum scene.
SCENE_COMMENT = 2
SCENE_FORUM = 3
SCENES_BY_FIELD = {"comment": SCENE_COMMENT}
FLAGGED_VERDICTS = frozenset({"review", "unchecked"})
VERDICTS = FLAGGED_VERDICTS | {"pass"}
# The saved text behind each flag target, as the model whose id is the flag's target_id and the
# column that contains the text.
FLAGGED_TEXT_COLUMNS = {
    "service_request.description": (ServiceRequest, "description"),
    "service_request.summary": (ServiceRequest, "summary"),
    "rating.comment": (Rating, "comment"),
}
# The two groups of the list, as cursors name them.
_UNRESOLVED = "unresolved"
_RESOLVED = "resolved"


class ContentRejected(ValidationError):
    status = 400
    code = "content_rejected"
    message = "内容包含不宜发布的信息，请修改后再提交。"


async def screen(services, user: User, text: str, field: str) -> str:
    """Check text written by user and return "pass", "review" or "unchecked".

    Returns "pass" without calling WeChat when settings.content_check is off, when the
    user has no openid (officers and other password accounts) or when the text is blank.
    Raises ContentRejected, carrying `field`, when WeChat rates the text risky. Returns
    "unchecked" when WeChat cannot be asked or fails, so the text is saved and flagged.
    """
    if not services.settings.content_check or not user.openid or not text.strip():
        return "pass"

    scene = SCENES_BY_FIELD.get(field, SCENE_FORUM)
    try:
        suggest = await services.wechat.check_text(text, user.openid, scene)
    except WeChatUnavailable:
        # The text itself stays out of the log.
        log.warning("content check unavailable, saving the text as unchecked user_id=%s field=%s", user.id, field)
        return "unchecked"

    if suggest == "risky":
        log.info("content rejected by WeChat's check user_id=%s field=%s", user.id, field)
        raise ContentRejected(field=field)
    return suggest


async def flag(verdict: str, target: str, target_id: int, user_id: int | None) -> None:
    """Record a ContentFlag for a "review" or "unchecked" verdict; "pass" records nothing.

    target names the saved text, such as "service_request.description". Raises ValueError
    for any other verdict.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}, got {verdict!r}")
    if verdict not in FLAGGED_VERDICTS:
        return

    content_flag = await ContentFlag.create(
        target=target, target_id=target_id, verdict=verdict, user_id=user_id, created_at=clock.now()
    )
    log.info(
        "content flagged flag_id=%s target=%s target_id=%s verdict=%s user_id=%s",
        content_flag.id,
        target,
        target_id,
        verdict,
        user_id,
    )


async def list_flags(*, cursor: str | None, limit: int) -> Page[ContentFlag]:
    """Read a page of flags: every unresolved flag first, then the resolved ones, each group
    newest first by id.

    The cursor carries the group as well as the id, so a flag resolved while an officer pages
    does not move the rest of the unresolved group out of reach.
    """
    group, before_id = _parse_flag_cursor(cursor)
    rows: list[ContentFlag] = []
    if group == _UNRESOLVED:
        # Two queries, because PostgreSQL and SQLite sort NULL resolved_at at opposite ends.
        unresolved = ContentFlag.filter(resolved_at__isnull=True)
        if before_id is not None:
            unresolved = unresolved.filter(id__lt=before_id)
        rows = await unresolved.order_by("-id").limit(limit + 1)
        before_id = None
    if len(rows) <= limit:
        resolved = ContentFlag.filter(resolved_at__isnull=False)
        if before_id is not None:
            resolved = resolved.filter(id__lt=before_id)
        rows += await resolved.order_by("-id").limit(limit + 1 - len(rows))
    return paging.page_of(rows, limit, _flag_cursor)


def _flag_cursor(content_flag: ContentFlag) -> str:
    group = _UNRESOLVED if content_flag.resolved_at is None else _RESOLVED
    return f"{group}.{content_flag.id}"


def _parse_flag_cursor(cursor: str | None) -> tuple[str, int | None]:
    """Return the group to continue in and the id to continue below. No cursor means the top of the list."""
    if cursor is None:
        return _UNRESOLVED, None
    group, _, raw_id = cursor.partition(".")
    if group not in (_UNRESOLVED, _RESOLVED):
        raise paging.invalid_cursor()
    return group, paging.parse_id(raw_id)


async def read_flag(flag_id: int) -> tuple[ContentFlag, str | None]:
    """Return a flag and the text it points at, so an officer can review that text.

    The text is None when the target is unknown or its row or column is empty. Raises NotFound
    for an unknown flag_id. The text is personal data, so callers must not log it.
    """
    content_flag = await ContentFlag.get_or_none(id=flag_id)
    if content_flag is None:
        raise NotFound("找不到该内容标记。")
    column = FLAGGED_TEXT_COLUMNS.get(content_flag.target)
    if column is None:
        log.warning("content flag has an unknown target flag_id=%s target=%s", flag_id, content_flag.target)
        return content_flag, None
    model, field = column
    texts = await model.filter(id=content_flag.target_id).values_list(field, flat=True)
    return content_flag, texts[0] if texts else None


async def resolve_flag(flag_id: int, officer: User) -> ContentFlag:
    """Mark a flag resolved and return it. Resolving it again keeps the first resolved_at.

    Raises NotFound for an unknown flag_id.
    """
    changed = await ContentFlag.filter(id=flag_id, resolved_at__isnull=True).update(resolved_at=clock.now())
    content_flag = await ContentFlag.get_or_none(id=flag_id)
    if content_flag is None:
        raise NotFound("找不到该内容标记。")
    if changed:
        log.info("content flag resolved flag_id=%s officer_id=%s", flag_id, officer.id)
    return content_flag

