"""Worker registration, certificate verification, duty, and the worker's search document."""

from __future__ import annotations

import logging
import re
import unicodedata

from collections.abc import AsyncIterator

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from backend import accounts, clock, outbox
from backend.catalog import CATEGORIES_BY_CODE, min_rank
from backend.context import Services
from backend.errors import Conflict, Forbidden, NotFound, ValidationError
from backend.locations import Location
from backend.matching import smoothed_rating
from backend.text import has_hidden_characters
from backend.models import (
    CERTIFICATE_RANKS,
    Agency,
    AgencyStatus,
    Role,
    User,
    Worker,
    WorkerStatus,
)
from search.base import (
    DEFAULT_LANGUAGES,
    IndexUnavailable,
    InvalidDocument,
    WorkerDocument,
    WorkerIndex,
    validate_document,
)

log = logging.getLogger(__name__)

MIN_SERVICE_RADIUS_M = 500
MAX_NAME_CHARS = 32
MAX_CERTIFICATE_NO_CHARS = 64  # the column's length
# Characters that print as nothing, so a pasted certificate number can carry them unseen: zero
# width space, zero width non-joiner and joiner, word joiner, and the byte order mark.
_ZERO_WIDTH_CHARS = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# The seeded, demo and load-test certificate numbers (XM2024000123, LOAD-…-W00001) are typed as
# ASCII letters, digits and '-'. Normalising upper-cases the number and removes every '-', so what
# is stored and compared is letters and digits only. Anything else left after normalising, such
# as Cyrillic А or Greek Ο, can look like a Latin letter and let one certificate register twice.
# NOTE: no official format was checked; widen the pattern if a real certificate number is rejected.
_CERTIFICATE_NO_PATTERN = re.compile(r"[A-Z0-9]+")
# A rejected profile whose certificate number another registration took keeps this in its
# unique column instead, followed by its own id. Lower case and ':' never pass
# parse_certificate_no(), so it cannot collide with a real number.
RELEASED_CERTIFICATE_NO_PREFIX = "released:"
MAX_SERVICE_RADIUS_M = 20_000
MAX_LANGUAGES = 10
MAX_LANGUAGE_CHARS = 32
QUOTED_MAX_CHARS = 32  # longer rejected values are not repeated back in error messages
_REBUILD_BATCH = 1000


def document_for(worker: Worker, agency: Agency) -> WorkerDocument:
    return WorkerDocument(
        worker_id=worker.id,
        lat=worker.lat,
        lng=worker.lng,
        categories=tuple(worker.categories),
        certificate_rank=CERTIFICATE_RANKS[worker.certificate_level.value],
        service_radius_m=worker.service_radius_m,
        rating=smoothed_rating(worker.rating_sum, worker.rating_count),
        agency_id=agency.id,
        agency_credit=agency.credit_score,
        district_code=worker.district_id,
        verified=worker.status == WorkerStatus.VERIFIED,
        on_duty=worker.on_duty,
        agency_status=agency.status.value,
        languages=tuple(worker.languages or DEFAULT_LANGUAGES),
        name=worker.name,
    )


async def sync_worker(index: WorkerIndex, worker_id: int) -> None:
    """Write the worker's current database state to the index now.

    When the index is unreachable or fails, an outbox row is recorded instead, so the scheduler's
    outbox.apply_pending() writes the worker once the index is back. Service functions record
    the outbox row inside their own transaction instead of calling this after it.
    """
    try:
        await outbox.write_workers(index, [worker_id])
    except IndexUnavailable as exc:
        log.warning("index write postponed to the outbox worker_id=%s error=%s", worker_id, exc)
        await outbox.record_worker_change(worker_id)


async def sync_agency_workers(index: WorkerIndex, agency_id: int) -> None:
    """Write every worker of the agency to the index now, or record the change in the outbox."""
    worker_ids = await Worker.filter(agency_id=agency_id).order_by("id").values_list("id", flat=True)
    try:
        await outbox.write_workers(index, list(worker_ids))
    except IndexUnavailable as exc:
        log.warning("index write postponed to the outbox agency_id=%s error=%s", agency_id, exc)
        await outbox.record_agency_change(agency_id)


async def _document_batches(batch_size: int = _REBUILD_BATCH) -> AsyncIterator[list[WorkerDocument]]:
    """Yield every worker's document in id order, leaving out invalid ones (logged)."""
    agencies = {agency.id: agency for agency in await Agency.all()}
    last_id = 0
    while True:
        workers = await Worker.filter(id__gt=last_id).order_by("id").limit(batch_size)
        if not workers:
            return
        last_id = workers[-1].id
        batch = []
        for worker in workers:
            agency = agencies.get(worker.agency_id) or await Agency.get(id=worker.agency_id)
            document = document_for(worker, agency)
            try:
                validate_document(document)
            except InvalidDocument as exc:
                log.error("worker left out of the rebuild, invalid document worker_id=%s error=%s", worker.id, exc)
                continue
            batch.append(document)
        yield batch


async def rebuild_index(services: Services) -> int:
    """Build a new index from every worker in the database, switch to it, and return the count.

    Searches keep using the old index until the switch. Changes applied to the old index
    while the new one was built are recorded again in the outbox, because the new one may
    have read those workers before the change.
    """
    started_at = clock.now()
    count = await services.index.replace_all(_document_batches())
    replayed = await outbox.requeue_applied_since(started_at)
    log.info("search index rebuilt workers=%s changes_replayed=%s", count, replayed)
    return count


async def ensure_index(services: Services) -> bool:
    """Apply the index settings, and build the index from the database when it was never built.

    Returns False, after logging, when the index is unreachable. The process still starts,
    requests wait in `matching`, and `scripts/reindex` or the next start builds the index.
    """
    try:
        await services.index.ensure_ready()
        if not await services.index.is_built():
            await rebuild_index(services)
    except IndexUnavailable as exc:
        log.error("search index not ready at start error=%s", exc)
        return False
    return True


def _quoted(value: object) -> str:
    """Quote a rejected list item for an error message: short printable text only, never a repr."""
    if isinstance(value, str) and value.isprintable() and 0 < len(value) <= QUOTED_MAX_CHARS:
        return f"「{value}」"
    return ""


def parse_languages(raw: object) -> list[str]:
    """Validate the languages a worker lists; None gives the default, 普通话."""
    if raw is None:
        return list(DEFAULT_LANGUAGES)
    if not isinstance(raw, list) or not raw or len(raw) > MAX_LANGUAGES:
        raise ValidationError(f"请填写 1 到 {MAX_LANGUAGES} 种服务语言。", field="languages")
    languages: list[str] = []
    for item in raw:
        value = item.strip() if isinstance(item, str) else ""
        if not value or len(value) > MAX_LANGUAGE_CHARS or any(c in value for c in "|,") or not value.isprintable():
            raise ValidationError(f"服务语言无效{_quoted(item)}，请填写语言名称，例如「闽南语」。", field="languages")
        if value not in languages:
            languages.append(value)
    return languages


def _parse_categories(raw: object, certificate_level: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError("请至少选择一个服务类别。", field="categories")
    categories: list[str] = []
    for code in raw:
        if not isinstance(code, str) or code not in CATEGORIES_BY_CODE:
            raise ValidationError(f"未知的服务类别{_quoted(code)}，请从服务类别列表中选择。", field="categories")
        if CERTIFICATE_RANKS[certificate_level] < min_rank(code):
            name = CATEGORIES_BY_CODE[code].name
            raise ValidationError(f"您的证书等级不足以提供「{name}」服务。", field="categories")
        if code not in categories:
            categories.append(code)
    return categories


def parse_worker_name(raw: object) -> str:
    """Trim a worker's name, which residents see, and raise ValidationError unless it is 1 to
    MAX_NAME_CHARS characters with no invisible or text-reversing ones."""
    name = raw.strip() if isinstance(raw, str) else ""
    if not name or len(name) > MAX_NAME_CHARS:
        raise ValidationError(f"姓名需为 1 到 {MAX_NAME_CHARS} 个字。", field="name")
    if has_hidden_characters(name):
        raise ValidationError("姓名中含有不可见的字符或控制字符，请删除后重新输入。", field="name")
    return name


def normalize_certificate_no(raw: str) -> str:
    """Fold full-width characters and case, and drop spaces, zero-width characters and hyphens,
    so one certificate cannot register twice under spellings such as XM2024-000002.

    NOTE: numbers stored before hyphens were dropped keep theirs, so a registration compares
    equal to one of them only if typed the same way. Strip '-' from workers.certificate_no once
    to bring such rows in line.
    """
    folded = "".join(unicodedata.normalize("NFKC", raw).split()).upper()
    return folded.translate(_ZERO_WIDTH_CHARS).replace("-", "")


def parse_certificate_no(raw: str) -> str:
    """Normalise a certificate number and raise ValidationError unless the result is 1 to
    MAX_CERTIFICATE_NO_CHARS ASCII letters or digits. The raw number may also contain '-'."""
    certificate_no = normalize_certificate_no(raw)
    if not certificate_no or len(certificate_no) > MAX_CERTIFICATE_NO_CHARS:
        raise ValidationError("证书编号格式不正确。", field="certificate_no")
    if not _CERTIFICATE_NO_PATTERN.fullmatch(certificate_no):
        raise ValidationError("证书编号只能由英文字母、数字和“-”组成，请对照证书重新输入。", field="certificate_no")
    return certificate_no


def shown_certificate_no(worker: Worker) -> str | None:
    """Return the worker's certificate number, or None once another registration took it."""
    if worker.certificate_no.startswith(RELEASED_CERTIFICATE_NO_PREFIX):
        return None
    return worker.certificate_no


async def _certificate_no_holder(certificate_no: str, user: User) -> Worker | None:
    """Find another user's profile with this number, or raise 409 certificate_no_taken when that
    profile is pending or verified. A rejected holder is returned, because the number may be
    taken from it."""
    holder = await Worker.filter(certificate_no=certificate_no).exclude(user_id=user.id).first()
    if holder is not None and holder.status != WorkerStatus.REJECTED:
        raise Conflict("该证书编号已被登记。", field="certificate_no", code="certificate_no_taken")
    return holder


async def _release_certificate_no(holder: Worker, certificate_no: str) -> None:
    """Take a certificate number away from a rejected profile, inside the caller's transaction.

    Someone may have registered with another person's number and been rejected, and the real
    holder must still be able to register. The update is conditional on the status and the
    number, so a concurrent resubmission or claim changes the row only once. When it changes
    nothing, the caller's insert meets the unique index and fails instead.
    """
    released = await Worker.filter(id=holder.id, status=WorkerStatus.REJECTED, certificate_no=certificate_no).update(
        certificate_no=f"{RELEASED_CERTIFICATE_NO_PREFIX}{holder.id}"
    )
    if released:
        log.info("certificate number taken from rejected worker_id=%s", holder.id)


async def register_worker(
    services: Services,
    user: User,
    *,
    agency_id: int,
    name: object,
    certificate_level: object,
    certificate_no: str,
    categories: object,
    location: Location,
    service_radius_m: int,
    languages: object = None,
) -> tuple[Worker, bool]:
    """Register the user as a worker, pending review, and return the worker and whether it is new.

    A user whose profile was rejected registers again with the same call: the new details
    replace the rejected profile, which keeps its id and ratings and goes back to pending.
    A pending or verified profile cannot be replaced (409 worker_exists).

    A certificate number belongs to at most one profile. When it belongs to another user's
    rejected profile, this registration takes it, and that profile must register again with a
    number of its own. A pending or verified holder keeps it (409 certificate_no_taken).
    """
    name = parse_worker_name(name)
    if not isinstance(certificate_level, str) or certificate_level not in CERTIFICATE_RANKS:
        raise ValidationError("证书等级只能是 assistant、intermediate 或 senior。", field="certificate_level")
    certificate_no = parse_certificate_no(certificate_no)
    parsed_categories = _parse_categories(categories, certificate_level)
    parsed_languages = parse_languages(languages)
    if not MIN_SERVICE_RADIUS_M <= service_radius_m <= MAX_SERVICE_RADIUS_M:
        raise ValidationError(
            f"服务半径需在 {MIN_SERVICE_RADIUS_M} 到 {MAX_SERVICE_RADIUS_M} 米之间。", field="service_radius_m"
        )
    agency = await Agency.get_or_none(id=agency_id)
    if agency is None:
        raise ValidationError("所选服务机构不存在。", field="agency_id", code="agency_not_found")
    existing = await Worker.get_or_none(user_id=user.id)
    if existing is not None and existing.status != WorkerStatus.REJECTED:
        raise Conflict("您已经提交过社工登记，无需重复提交。", code="worker_exists")
    holder = await _certificate_no_holder(certificate_no, user)

    details = {
        "agency_id": agency.id,
        "name": name,
        "certificate_level": certificate_level,
        "certificate_no": certificate_no,
        "categories": parsed_categories,
        "languages": parsed_languages,
        "lat": location.lat,
        "lng": location.lng,
        "district_id": location.district_code,
        "service_radius_m": service_radius_m,
    }
    try:
        async with in_transaction():
            if holder is not None:
                await _release_certificate_no(holder, certificate_no)
            if existing is None:
                worker = await Worker.create(user=user, **details)
                await accounts.grant_role(user, Role.WORKER)
            else:
                worker = await _resubmit(existing, details)
            await outbox.record_worker_change(worker.id)
    except IntegrityError:
        # A concurrent registration with the same user or certificate number won.
        raise Conflict("该证书编号或账号已被登记。", field="certificate_no", code="certificate_no_taken") from None

    await outbox.apply_pending(services, worker_ids=[worker.id])
    if existing is None:
        log.info("worker registered worker_id=%s agency_id=%s", worker.id, agency.id)
    else:
        log.info("rejected worker registered again worker_id=%s agency_id=%s", worker.id, agency.id)
    return worker, existing is None


async def _resubmit(rejected: Worker, details: dict) -> Worker:
    """Replace a rejected profile with new details and put it back to pending review."""
    # Conditional on the status, so a concurrent resubmission or review changes the row only once.
    replaced = await Worker.filter(id=rejected.id, status=WorkerStatus.REJECTED).update(
        status=WorkerStatus.PENDING, rejection_reason=None, verified_at=None, on_duty=False, **details
    )
    if not replaced:
        raise Conflict("您的社工登记刚刚已被更新，请刷新后查看审核进度。", code="worker_exists")
    await rejected.refresh_from_db()
    return rejected


async def own_profile(user: User) -> Worker:
    """Return the caller's worker profile with its agency, or 404 when the caller has none."""
    worker = await Worker.get_or_none(user_id=user.id).prefetch_related("agency")
    if worker is None:
        raise NotFound("您还没有提交社工登记。", code="not_a_worker")
    return worker


# The statuses each review decision may leave. Verifying takes only a pending profile, so a
# rejected one must be resubmitted first. Rejecting a verified profile revokes its verification,
# for a certificate found invalid after review.
VERIFIABLE_STATUSES = (WorkerStatus.PENDING,)
REJECTABLE_STATUSES = (WorkerStatus.PENDING, WorkerStatus.VERIFIED)
_REVIEW_CONFLICTS = {
    # Only when a resubmission came between the failed update and the read.
    WorkerStatus.PENDING: ("worker_status_changed", "该社工的登记刚刚重新提交，请刷新列表后重新审核。"),
    WorkerStatus.VERIFIED: ("worker_already_verified", "该社工已通过审核，请刷新列表查看最新状态。"),
    WorkerStatus.REJECTED: ("worker_already_rejected", "该社工的登记已被驳回，需等其重新提交后才能再次审核。"),
}


async def worker_for_review(worker_id: int, officer: User | None) -> Worker:
    """Return the worker an officer is about to verify or reject, or raise 404, or 403 self_review
    when it is the officer's own profile. Without `officer`, as in tests, no self-review check runs."""
    worker = await Worker.get_or_none(id=worker_id)
    if worker is None:
        raise NotFound("找不到该社工。")
    if officer is not None and worker.user_id == officer.id:
        raise Forbidden("不能审核自己的社工证书，请由其他工作人员审核。", code="self_review")
    return worker


async def review_conflict(worker_id: int) -> Conflict:
    """Build the 409 for a review that found the worker in a status it may not leave, read again
    because the status may have changed since the caller's read."""
    status = (await Worker.get(id=worker_id)).status
    code, message = _REVIEW_CONFLICTS[status]
    return Conflict(message, code=code)


async def verify_worker(services: Services, worker_id: int, officer: User | None = None) -> Worker:
    """Verify a pending worker's certificate, or raise 409 when the worker is not pending."""
    worker = await worker_for_review(worker_id, officer)

    # Conditional on the status, so a concurrent rejection or resubmission is not overwritten.
    async with in_transaction():
        verified = await Worker.filter(id=worker.id, status__in=VERIFIABLE_STATUSES).update(
            status=WorkerStatus.VERIFIED, verified_at=clock.now(), rejection_reason=None
        )
        if verified:
            await outbox.record_worker_change(worker.id)
    if not verified:
        raise await review_conflict(worker.id)

    await outbox.apply_pending(services, worker_ids=[worker.id])
    await worker.refresh_from_db()
    log.info("worker verified worker_id=%s", worker.id)
    return worker


async def worker_of(user: User) -> Worker:
    """Return the caller's worker profile, or 403 when the caller has not registered as one."""
    worker = await Worker.get_or_none(user_id=user.id)
    if worker is None:
        raise Forbidden("请先完成社工登记。", code="not_a_worker")
    return worker


async def set_duty(services: Services, user: User, *, on_duty: bool, location: Location | None) -> Worker:
    worker = await worker_of(user)
    if on_duty and worker.status != WorkerStatus.VERIFIED:
        raise Conflict("您的证书尚未通过审核，暂不能接单。", field="on_duty", code="worker_not_verified")
    if on_duty and (await Agency.get(id=worker.agency_id)).status != AgencyStatus.APPROVED:
        raise Conflict("您所属的服务机构尚未通过备案或已暂停，暂不能接单。", field="on_duty", code="agency_not_approved")
    worker.on_duty = on_duty
    update_fields = ["on_duty"]
    if location is not None:
        worker.lat, worker.lng, worker.district_id = location.lat, location.lng, location.district_code
        update_fields += ["lat", "lng", "district_id"]
    async with in_transaction():
        await worker.save(update_fields=update_fields)
        await outbox.record_worker_change(worker.id)
    await outbox.apply_pending(services, worker_ids=[worker.id])
    if not on_duty:
        from backend import dispatch

        await dispatch.release_worker(services, worker.id, reason="off_duty", release_accepted=False)
    return worker
