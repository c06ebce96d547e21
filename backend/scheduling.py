"""Preferred service times and a worker's availability: overlapping jobs and the active-job cap."""

from __future__ import annotations

from datetime import datetime, timedelta

from backend import clock
from backend.errors import Conflict, ValidationError
from backend.models import RequestStatus, ServiceRequest

MAX_DAYS_AHEAD = 30
# A request without preferred times is taken to need the two hours after it was made.
DEFAULT_JOB_DURATION = timedelta(hours=2)
# Allows for the clock of a phone that runs a little behind.
PAST_GRACE = timedelta(minutes=5)
ACTIVE_STATUSES = (RequestStatus.ACCEPTED, RequestStatus.IN_SERVICE)


def _parse_time(raw: object, field: str) -> datetime:
    if not isinstance(raw, str):
        raise ValidationError("时间格式应为 ISO-8601，例如 2026-12-05T09:00:00+08:00。", field=field)
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValidationError("时间格式应为 ISO-8601，例如 2026-12-05T09:00:00+08:00。", field=field) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError("时间需要带时区，例如 2026-12-05T09:00:00+08:00。", field=field)
    return moment


def parse_preferred_window(start_raw: object, end_raw: object) -> tuple[datetime | None, datetime | None]:
    """Validate optional preferred_start/preferred_end: aware, not past, at most 30 days ahead."""
    if start_raw is None and end_raw is None:
        return None, None
    if start_raw is None:
        raise ValidationError("填写结束时间时也请填写开始时间。", field="preferred_start")

    now = clock.now()
    start = _parse_time(start_raw, "preferred_start")
    if start < now - PAST_GRACE:
        raise ValidationError("开始时间不能早于现在。", field="preferred_start")
    if start > now + timedelta(days=MAX_DAYS_AHEAD):
        raise ValidationError(f"只能预约 {MAX_DAYS_AHEAD} 天内的服务。", field="preferred_start")

    end = _parse_time(end_raw, "preferred_end") if end_raw is not None else start + DEFAULT_JOB_DURATION
    if end <= start:
        raise ValidationError("结束时间需晚于开始时间。", field="preferred_end")
    if end > now + timedelta(days=MAX_DAYS_AHEAD, hours=24):
        raise ValidationError(f"只能预约 {MAX_DAYS_AHEAD} 天内的服务。", field="preferred_end")
    return start, end


def job_window(request: ServiceRequest) -> tuple[datetime, datetime]:
    start = request.preferred_start or request.created_at
    end = request.preferred_end or start + DEFAULT_JOB_DURATION
    return start, end


async def check_worker_available(worker_id: int, request: ServiceRequest, max_active_jobs: int) -> None:
    """Raise 409 when the worker already has max_active_jobs, or a job overlapping this one.

    Call inside the transaction that assigns the job, after locking the worker's row, so two
    accepts by the same worker cannot both pass.
    """
    active = await ServiceRequest.filter(worker_id=worker_id, status__in=list(ACTIVE_STATUSES)).exclude(id=request.id)
    if len(active) >= max_active_jobs:
        raise Conflict(f"您已有 {len(active)} 个进行中的服务，请先完成后再接单。", code="too_many_active_jobs")
    start, end = job_window(request)
    for job in active:
        other_start, other_end = job_window(job)
        if start < other_end and other_start < end:
            raise Conflict("该服务与您已接的服务时间冲突。", code="schedule_conflict")
