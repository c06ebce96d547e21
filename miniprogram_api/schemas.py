"""Request body shapes, for the OpenAPI document at /docs; validation is done by the handlers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WeChatLoginBody:
    code: str


@dataclass
class PasswordLoginBody:
    username: str
    password: str


@dataclass
class LocationBody:
    lat: float
    lng: float
    coord_system: str = "gcj02"  # or "wgs84"


@dataclass
class WorkerRegistrationBody:
    agency_id: int
    name: str
    certificate_level: str  # assistant | intermediate | senior
    certificate_no: str
    categories: list[str]
    location: LocationBody
    service_radius_m: int


@dataclass
class DutyBody:
    on_duty: bool
    location: LocationBody | None = None


@dataclass
class ServiceRequestBody:
    category: str
    description: str
    address: str
    location: LocationBody


@dataclass
class CompleteBody:
    service_minutes: int
    summary: str


@dataclass
class RatingBody:
    stars: int
    comment: str | None = None
