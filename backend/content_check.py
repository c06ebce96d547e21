"""Screening of user text with WeChat's msgSecCheck, and the flags that officers review.

screen() runs before the text is saved: "risky" text is rejected, and text that WeChat
sends to review, or that could not be checked, is saved and then flagged with flag().
"""

from __future__ import annotations

import logging

from backend import clock
from backend.errors import NotFound, ValidationError
from backend.models import ContentFlag, Rating, ServiceRequest, User
from backend.wechat import WeChatUnavailable

log = logging.getLogger(__name__)

# msgSecCheck 2.0 scenes. Rating comments are comments; the other texts (request
# descriptions, service summaries) are posts that others read, closest to the forum scene.
SCENE_COMMENT = 2
SCENE_FORUM = 3
SCENES_BY_FIELD = {"comment": SCENE_COMMENT}
FLAGGED_VERDICTS = frozenset({"review", "unchecked"})
VERDICTS = FLAGGED_VERDICTS | {"pass"}
MAX_LISTED_FLAGS = 100
# The saved text behind each flag target, as the model whose id is the flag's target_id and the
# column that contains the text.
FLAGGED_TEXT_COLUMNS = {
    "service_request.description": (ServiceRequest, "description"),
    "service_request.summary": (ServiceRequest, "summary"),
    "rating.comment": (Rating, "comment"),
}


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


async def list_flags(limit: int = MAX_LISTED_FLAGS) -> list[ContentFlag]:
    """Return up to `limit` flags: unresolved ones first, each group newest first."""
    # Two queries, because PostgreSQL and SQLite sort NULL resolved_at at opposite ends.
    unresolved = await ContentFlag.filter(resolved_at__isnull=True).order_by("-created_at", "-id").limit(limit)
    remaining = limit - len(unresolved)
    if remaining <= 0:
        return unresolved
    resolved = await ContentFlag.filter(resolved_at__isnull=False).order_by("-created_at", "-id").limit(remaining)
    return unresolved + resolved


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

