"""Tortoise ORM models. Times are stored timezone-aware in UTC; coordinates in GCJ-02."""

from __future__ import annotations

from enum import Enum

from tortoise import fields
from tortoise.models import Model


class Role(str, Enum):
    RESIDENT = "resident"
    WORKER = "worker"
    AGENCY_MANAGER = "agency_manager"
    STATION_STAFF = "station_staff"
    OFFICER = "officer"


class CertificateLevel(str, Enum):
    """Social-work certificate levels; the order of RANKS below is their seniority."""

    ASSISTANT = "assistant"  # 助理社会工作师
    INTERMEDIATE = "intermediate"  # 社会工作师
    SENIOR = "senior"  # 高级社会工作师


CERTIFICATE_RANKS = {
    CertificateLevel.ASSISTANT.value: 0,
    CertificateLevel.INTERMEDIATE.value: 1,
    CertificateLevel.SENIOR.value: 2,
}


class AgencyStatus(str, Enum):
    PENDING = "pending"
    APPROVED = "approved"
    SUSPENDED = "suspended"


class WorkerStatus(str, Enum):
    PENDING = "pending"
    VERIFIED = "verified"
    REJECTED = "rejected"


class RequestStatus(str, Enum):
    MATCHING = "matching"
    OFFERED = "offered"
    ACCEPTED = "accepted"
    IN_SERVICE = "in_service"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class DispatchStage(str, Enum):
    """The stage of an unassigned request's search: a search ring, or its station's queue."""

    RING = "ring"
    STATION_QUEUE = "station_queue"


class OfferStatus(str, Enum):
    OPEN = "open"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"  # accepted, then given back by the worker
    CLOSED = "closed"  # another worker won, or the request was cancelled


class NotificationStatus(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    UNDELIVERABLE = "undeliverable"  # the user has not subscribed (WeChat 43101)
    FAILED = "failed"  # retries used up


class User(Model):
    id = fields.IntField(primary_key=True)
    openid = fields.CharField(max_length=64, unique=True, null=True)
    username = fields.CharField(max_length=64, unique=True, null=True)
    password_hash = fields.CharField(max_length=255, null=True)
    roles = fields.JSONField(default=list)
    agency = fields.ForeignKeyField("models.Agency", related_name="managers", null=True)
    station = fields.ForeignKeyField("models.ServiceStation", related_name="staff", null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "users"


class District(Model):
    code = fields.CharField(max_length=6, primary_key=True)
    name = fields.CharField(max_length=32)

    class Meta:
        table = "districts"


class ServiceStation(Model):
    """A social-work service station, one per street or town, which represents its street in matching."""

    id = fields.IntField(primary_key=True)
    street_code = fields.CharField(max_length=9, unique=True)
    street_name = fields.CharField(max_length=64)
    district = fields.ForeignKeyField("models.District", related_name="stations")
    name = fields.CharField(max_length=128)
    lat = fields.FloatField()
    lng = fields.FloatField()

    class Meta:
        table = "service_stations"


class Agency(Model):
    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=128, unique=True)
    district = fields.ForeignKeyField("models.District", related_name="agencies")
    status = fields.CharEnumField(AgencyStatus, max_length=16, default=AgencyStatus.PENDING)
    credit_score = fields.FloatField(default=75.0)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "agencies"


class CreditEvent(Model):
    """One change of an agency's credit_score, with the reason, kept for its public history."""

    id = fields.IntField(primary_key=True)
    agency = fields.ForeignKeyField("models.Agency", related_name="credit_events", db_index=True)
    score = fields.FloatField()
    reason_code = fields.CharField(max_length=32, default="rating")
    reason = fields.CharField(max_length=255)  # Simplified Chinese, shown on the agency dashboard
    components = fields.JSONField(default=dict)
    at = fields.DatetimeField()

    class Meta:
        table = "credit_events"
        ordering = ["id"]


class Worker(Model):
    id = fields.IntField(primary_key=True)
    user = fields.OneToOneField("models.User", related_name="worker")
    agency = fields.ForeignKeyField("models.Agency", related_name="workers", db_index=True)
    name = fields.CharField(max_length=64)
    certificate_level = fields.CharEnumField(CertificateLevel, max_length=16)
    certificate_no = fields.CharField(max_length=64, unique=True)
    categories = fields.JSONField(default=list)
    # Languages the worker speaks with residents, e.g. 普通话, 闽南语, English, 手语.
    languages = fields.JSONField(default=lambda: ["普通话"])
    lat = fields.FloatField()
    lng = fields.FloatField()
    district = fields.ForeignKeyField("models.District", related_name="workers")
    service_radius_m = fields.IntField()
    status = fields.CharEnumField(WorkerStatus, max_length=16, default=WorkerStatus.PENDING)
    rejection_reason = fields.CharField(max_length=200, null=True)
    on_duty = fields.BooleanField(default=False)
    rating_sum = fields.IntField(default=0)
    rating_count = fields.IntField(default=0)
    verified_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "workers"


class ServiceRequest(Model):
    id = fields.IntField(primary_key=True)
    resident = fields.ForeignKeyField("models.User", related_name="service_requests")
    category = fields.CharField(max_length=32)
    language = fields.CharField(max_length=32, null=True)  # a language the resident wants the worker to speak, e.g. 闽南语
    description = fields.TextField()
    address = fields.CharField(max_length=255)
    lat = fields.FloatField()
    lng = fields.FloatField()
    district = fields.ForeignKeyField("models.District", related_name="service_requests")
    # The nearest station of the request's district, standing in for its street.
    station = fields.ForeignKeyField("models.ServiceStation", related_name="service_requests", null=True)
    status = fields.CharEnumField(RequestStatus, max_length=16, default=RequestStatus.MATCHING)
    stage = fields.CharEnumField(DispatchStage, max_length=16, default=DispatchStage.RING)
    search_ring = fields.SmallIntField(default=1)  # 1-based index into SEARCH_RADII_M
    worker = fields.ForeignKeyField("models.Worker", related_name="service_requests", null=True, db_index=True)
    preferred_start = fields.DatetimeField(null=True)
    preferred_end = fields.DatetimeField(null=True)
    accepted_at = fields.DatetimeField(null=True)
    started_at = fields.DatetimeField(null=True)
    checkin_lat = fields.FloatField(null=True)
    checkin_lng = fields.FloatField(null=True)
    completed_at = fields.DatetimeField(null=True)
    completion_lat = fields.FloatField(null=True)
    completion_lng = fields.FloatField(null=True)
    cancelled_at = fields.DatetimeField(null=True)
    service_minutes = fields.IntField(null=True)
    summary = fields.TextField(null=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "service_requests"
        # The scheduler's scans: requests stalled in matching, and offered requests.
        indexes = (("status", "stage", "updated_at"),)


class Offer(Model):
    id = fields.IntField(primary_key=True)
    service_request = fields.ForeignKeyField("models.ServiceRequest", related_name="offers")
    worker = fields.ForeignKeyField("models.Worker", related_name="offers")
    status = fields.CharEnumField(OfferStatus, max_length=16, default=OfferStatus.OPEN)
    ring = fields.SmallIntField(default=1)
    distance_m = fields.IntField()
    score = fields.FloatField()
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()

    class Meta:
        table = "offers"
        unique_together = (("service_request", "worker"),)
        # Expiry scans open offers by time; a worker's poll reads their open offers.
        indexes = (("status", "expires_at"), ("worker_id", "status"))


class Rating(Model):
    id = fields.IntField(primary_key=True)
    # unique: the database itself stops a second rating of the same request.
    service_request = fields.OneToOneField("models.ServiceRequest", related_name="rating")
    worker = fields.ForeignKeyField("models.Worker", related_name="ratings")
    agency = fields.ForeignKeyField("models.Agency", related_name="ratings", db_index=True)
    resident = fields.ForeignKeyField("models.User", related_name="ratings_given")
    # Only a resident's latest rating of a worker counts toward averages and credit, so a
    # worker cannot raise their own score through repeated jobs for one (possibly fake) account.
    counted = fields.BooleanField(default=True)
    stars = fields.SmallIntField()
    comment = fields.TextField(null=True)
    created_at = fields.DatetimeField()

    class Meta:
        table = "ratings"
        indexes = (("resident_id", "worker_id"),)


class DispatchEvent(Model):
    """A step of a request's dispatch, for the resident's timeline and for audits.

    `dedupe_key` is unique, so a step that must happen once (widening to ring 2, moving to the
    station queue) cannot be recorded twice even when two scheduler processes race.
    """

    id = fields.IntField(primary_key=True)
    service_request = fields.ForeignKeyField("models.ServiceRequest", related_name="events", db_index=True)
    kind = fields.CharField(max_length=32)
    ring = fields.SmallIntField(null=True)
    worker_id = fields.IntField(null=True)
    dedupe_key = fields.CharField(max_length=96, unique=True, null=True)
    at = fields.DatetimeField()

    class Meta:
        table = "dispatch_events"
        ordering = ["id"]


class Notification(Model):
    """A WeChat subscribe message waiting to be sent, sent, or given up on.

    Rows are written in the same transaction as the state change they announce and sent later
    off the request path, so a WeChat failure never blocks or rolls back that change.
    """

    id = fields.IntField(primary_key=True)
    user = fields.ForeignKeyField("models.User", related_name="notifications")
    kind = fields.CharField(max_length=32)
    service_request_id = fields.IntField(null=True)
    data = fields.JSONField(default=dict)
    status = fields.CharEnumField(NotificationStatus, max_length=16, default=NotificationStatus.PENDING)
    attempts = fields.SmallIntField(default=0)
    next_attempt_at = fields.DatetimeField()
    last_errcode = fields.IntField(null=True)
    dedupe_key = fields.CharField(max_length=96, unique=True)
    created_at = fields.DatetimeField()
    sent_at = fields.DatetimeField(null=True)

    class Meta:
        table = "notifications"
        # Delivery scans pending rows that are due.
        indexes = (("status", "next_attempt_at"),)


class ContentFlag(Model):
    """Free text that WeChat's content check sent to review, or that could not be checked."""

    id = fields.IntField(primary_key=True)
    target = fields.CharField(max_length=48)  # e.g. "service_request.description"
    target_id = fields.IntField()
    verdict = fields.CharField(max_length=16)  # "review" or "unchecked"
    user = fields.ForeignKeyField("models.User", related_name="content_flags", null=True)
    created_at = fields.DatetimeField()
    resolved_at = fields.DatetimeField(null=True)

    class Meta:
        table = "content_flags"


class IndexOutbox(Model):
    """A change that the search index must pick up: one worker, or every worker of an agency.

    Rows are written in the same transaction as the change, so a crash or an index outage
    cannot lose it. backend.outbox applies them later from the database's current state.
    Applied rows are kept for a day (backend.outbox.RETENTION_S) so a rebuild can replay the
    changes that reached the old index while the new one was being built.
    """

    id = fields.BigIntField(primary_key=True)
    kind = fields.CharField(max_length=16)  # "worker" or "agency"
    target_id = fields.IntField()
    created_at = fields.DatetimeField()
    next_attempt_at = fields.DatetimeField()
    attempts = fields.SmallIntField(default=0)
    claimed_by = fields.CharField(max_length=32, null=True)
    claimed_until = fields.DatetimeField(null=True)
    applied_at = fields.DatetimeField(null=True)
    last_error = fields.CharField(max_length=255, null=True)

    class Meta:
        table = "index_outbox"
        indexes = (("applied_at", "next_attempt_at"), ("kind", "target_id"))
