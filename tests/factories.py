"""Builders of test data in the real database, and logins through the stand-in WeChat server."""

from __future__ import annotations

import itertools

from backend import accounts, clock, divisions
from backend.models import Agency, AgencyStatus, District, Offer, Role, ServiceStation, User, Worker, WorkerStatus
from backend.workers import sync_worker
from tests.conftest import fresh_code

# 思明区's representative point (GCJ-02) from the district data; about 1.1 km per 0.01 degree.
SIMING = (24.462059, 118.087828)
SIMING_CODE = "350203"
# A check-in body at the default request point, for start and complete.
AT_DOOR = {"location": {"lat": SIMING[0], "lng": SIMING[1]}}
_serial = itertools.count(1)


def north_of(point: tuple[float, float], metres: float) -> tuple[float, float]:
    return point[0] + metres / 111_195.0, point[1]


async def make_city() -> dict[str, Agency]:
    """The 6 districts, a station at each district's point, and three agencies in 思明区."""
    for district in divisions.districts():
        await District.create(code=district.code, name=district.name)
        street = divisions.streets(district.code)[0]
        await ServiceStation.create(
            street_code=street.code,
            street_name=street.name,
            district_id=district.code,
            name=f"{street.name}社会工作服务站",
            lat=district.center_lat,
            lng=district.center_lng,
        )
    approved = await Agency.create(name="思明测试社工中心", district_id=SIMING_CODE, status=AgencyStatus.APPROVED)
    other = await Agency.create(name="思明第二社工中心", district_id=SIMING_CODE, status=AgencyStatus.APPROVED)
    pending = await Agency.create(name="待审社工中心", district_id=SIMING_CODE, status=AgencyStatus.PENDING)
    return {"approved": approved, "other": other, "pending": pending}


async def make_worker(
    services,
    agency: Agency,
    point: tuple[float, float] = SIMING,
    *,
    categories: tuple[str, ...] = ("elderly_care",),
    level: str = "intermediate",
    radius_m: int = 5000,
    verified: bool = True,
    on_duty: bool = True,
    person: str | None = None,
) -> Worker:
    serial = next(_serial)
    user = await User.create(openid=f"test-worker-{serial}", roles=[Role.RESIDENT.value, Role.WORKER.value])
    worker = await Worker.create(
        user=user,
        agency=agency,
        name=f"社工{serial}",
        certificate_level=level,
        certificate_no=f"TEST{serial:06d}",
        categories=list(categories),
        lat=point[0],
        lng=point[1],
        district_id=divisions.district_at(*point),
        service_radius_m=radius_m,
        status=WorkerStatus.VERIFIED if verified else WorkerStatus.PENDING,
        verified_at=clock.now() if verified else None,
        on_duty=on_duty,
    )
    await sync_worker(services.index, worker.id)
    return worker


async def token_for_user(services, user: User) -> str:
    return await accounts.issue_token(services.redis, user.id, 3600)


async def worker_headers(services, worker: Worker) -> dict[str, str]:
    user = await User.get(id=worker.user_id)
    return {"Authorization": f"Bearer {await token_for_user(services, user)}"}


async def login_resident(client, person: str = "resident-a") -> tuple[dict[str, str], int]:
    _, response = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code(person)})
    assert response.status == 200, response.json
    return {"Authorization": f"Bearer {response.json['token']}"}, response.json["user"]["id"]


async def officer_headers(services, username: str = "officer") -> dict[str, str]:
    user = await accounts.ensure_officer(username, "officer-password-123")
    return {"Authorization": f"Bearer {await token_for_user(services, user)}"}


async def offered_worker_ids(request_id: int) -> list[int]:
    """Read the workers offered a request from the database, best ranked first.

    Residents see only a summary of the offers, so tests of who was matched read the offers here.
    The order is the ranking's (score, then distance, then worker id), from the stored offers.
    """
    offers = Offer.filter(service_request_id=request_id).order_by("-score", "distance_m", "worker_id")
    return list(await offers.values_list("worker_id", flat=True))


def request_body(point: tuple[float, float] = SIMING, category: str = "elderly_care", **overrides) -> dict:
    body = {
        "category": category,
        "description": "家中老人需要上门陪伴和协助洗浴",
        "address": "思明区厦禾路100号3栋502",
        "location": {"lat": point[0], "lng": point[1]},
    }
    body.update(overrides)
    return body
