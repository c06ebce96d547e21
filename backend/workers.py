"""Worker registration, certificate verification, duty, and the worker's search document."""

from __future__ import annotations

import logging

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from backend import accounts, clock
from backend.catalog import CATEGORIES_BY_CODE, min_rank
from backend.context import Services
from backend.errors import Conflict, Forbidden, NotFound, ValidationError
from backend.locations import Location
from backend.matching import smoothed_rating
from backend.models import (
    CERTIFICATE_RANKS,
    Agency,
    AgencyStatus,
    Role,
    User,
    Worker,
    WorkerStatus,
)
from search.base import IndexUnavailable, WorkerDocument, WorkerIndex

log = logging.getLogger(__name__)

MIN_SERVICE_RADIUS_M = 500
MAX_SERVICE_RADIUS_M = 20_000
INDEX_READY_KEY = "linli:index-built"


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
        matchable=(
            worker.status == WorkerStatus.VERIFIED
            and worker.on_duty
            and agency.status == AgencyStatus.APPROVED
        ),
    )


async def sync_worker(index: WorkerIndex, worker_id: int) -> None:
    """Write the worker's current database state to the index.

    NOTE: a failed write is only logged; the worker is repaired by the next write or by the
    rebuild at start. An outbox that retries until the index answers is still to come.
    """
    worker = await Worker.get_or_none(id=worker_id).prefetch_related("agency")
    try:
        if worker is None:
            await index.remove(worker_id)
        else:
            await index.upsert(document_for(worker, worker.agency))
    except IndexUnavailable:
        log.error("index out of step with the database worker_id=%s", worker_id)


async def sync_agency_workers(index: WorkerIndex, agency_id: int) -> None:
    for worker_id in await Worker.filter(agency_id=agency_id).values_list("id", flat=True):
        await sync_worker(index, worker_id)


async def rebuild_index(services: Services) -> int:
    """Replace the index contents with every worker in the database; return the count."""
    await services.index.clear()
    agencies = {agency.id: agency for agency in await Agency.all()}
    count = 0
    batch_size = 1000
    offset = 0
    while True:
        workers = await Worker.all().order_by("id").offset(offset).limit(batch_size)
        if not workers:
            break
        for worker in workers:
            await services.index.upsert(document_for(worker, agencies[worker.agency_id]))
        count += len(workers)
        offset += batch_size
    await services.redis.set(INDEX_READY_KEY, "1")
    log.info("search index rebuilt workers=%s", count)
    return count


async def ensure_index(services: Services) -> None:
    """Build the index from the database when this Redis has none (a fresh embedded server)."""
    if not await services.redis.exists(INDEX_READY_KEY):
        await rebuild_index(services)


def _parse_categories(raw: object, certificate_level: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError("请至少选择一个服务类别。", field="categories")
    categories: list[str] = []
    for code in raw:
        if not isinstance(code, str) or code not in CATEGORIES_BY_CODE:
            raise ValidationError(f"未知的服务类别：{code}。", field="categories")
        if CERTIFICATE_RANKS[certificate_level] < min_rank(code):
            name = CATEGORIES_BY_CODE[code].name
            raise ValidationError(f"您的证书等级不足以提供「{name}」服务。", field="categories")
        if code not in categories:
            categories.append(code)
    return categories


async def register_worker(
    services: Services,
    user: User,
    *,
    agency_id: int,
    name: str,
    certificate_level: str,
    certificate_no: str,
    categories: object,
    location: Location,
    service_radius_m: int,
) -> Worker:
    if certificate_level not in CERTIFICATE_RANKS:
        raise ValidationError("证书等级只能是 assistant、intermediate 或 senior。", field="certificate_level")
    parsed_categories = _parse_categories(categories, certificate_level)
    if not MIN_SERVICE_RADIUS_M <= service_radius_m <= MAX_SERVICE_RADIUS_M:
        raise ValidationError(
            f"服务半径需在 {MIN_SERVICE_RADIUS_M} 到 {MAX_SERVICE_RADIUS_M} 米之间。", field="service_radius_m"
        )
    agency = await Agency.get_or_none(id=agency_id)
    if agency is None:
        raise ValidationError("所选服务机构不存在。", field="agency_id", code="agency_not_found")
    if await Worker.exists(user_id=user.id):
        raise Conflict("您已经提交过社工登记。", code="worker_exists")
    if await Worker.exists(certificate_no=certificate_no):
        raise Conflict("该证书编号已被登记。", field="certificate_no", code="certificate_no_taken")

    try:
        async with in_transaction():
            worker = await Worker.create(
                user=user,
                agency=agency,
                name=name,
                certificate_level=certificate_level,
                certificate_no=certificate_no,
                categories=parsed_categories,
                lat=location.lat,
                lng=location.lng,
                district_id=location.district_code,
                service_radius_m=service_radius_m,
            )
            await accounts.grant_role(user, Role.WORKER)
    except IntegrityError:
        # A concurrent registration with the same user or certificate number won.
        raise Conflict("该证书编号或账号已被登记。", field="certificate_no", code="certificate_no_taken") from None

    await sync_worker(services.index, worker.id)
    log.info("worker registered worker_id=%s agency_id=%s", worker.id, agency.id)
    return worker


async def verify_worker(services: Services, worker_id: int) -> Worker:
    worker = await Worker.get_or_none(id=worker_id)
    if worker is None:
        raise NotFound("找不到该社工。")
    if worker.status != WorkerStatus.VERIFIED:
        worker.status = WorkerStatus.VERIFIED
        worker.verified_at = clock.now()
        await worker.save(update_fields=["status", "verified_at"])
        await sync_worker(services.index, worker.id)
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
    worker.on_duty = on_duty
    update_fields = ["on_duty"]
    if location is not None:
        worker.lat, worker.lng, worker.district_id = location.lat, location.lng, location.district_code
        update_fields += ["lat", "lng", "district_id"]
    await worker.save(update_fields=update_fields)
    await sync_worker(services.index, worker.id)
    return worker
