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
    languages: list[str] | None = None  # e.g. ["普通话", "闽南语"]; default ["普通话"]


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
    preferred_start: str | None = None  # ISO-8601 with offset, e.g. 2026-12-05T09:00:00+08:00
    preferred_end: str | None = None
    language: str | None = None  # a language the worker should speak, e.g. "闽南语"


@dataclass
class CompleteBody:
    service_minutes: int
    summary: str
    location: LocationBody


@dataclass
class RatingBody:
    stars: int
    comment: str | None = None


@dataclass
class CheckInBody:
    location: LocationBody


@dataclass
class AssignBody:
    worker_id: int
