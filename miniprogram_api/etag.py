"""JSON responses with a strong ETag, and 304 Not Modified when the client already has the body.

The mini-program polls a request's page while it waits for a worker. With If-None-Match it
downloads the body again only when the body changed, which saves data on weak networks.
"""

from __future__ import annotations

import hashlib
import re

from sanic import Request
from sanic.response import HTTPResponse, json

# private: the body is for the logged-in user only. no-cache: a client must revalidate before
# each use, so the mini-program does not show a resident a stale status.
CACHE_CONTROL = "private, no-cache"
# Entity tags are quoted and cannot contain a double quote (RFC 9110, section 8.8.3), so every
# quoted string of an If-None-Match list is one tag, with or without the W/ prefix.
_OPAQUE_TAG = re.compile(r'"([^"]*)"')
_CONDITIONAL_METHODS = frozenset({"GET", "HEAD"})


def _if_none_match_matches(request: Request, opaque_tag: str) -> bool:
    """Apply If-None-Match with the weak comparison that RFC 9110 (section 13.1.2) prescribes."""
    values = request.headers.getall("if-none-match", [])
    if not values:
        return False
    header = ",".join(values)
    if header.strip() == "*":
        return True
    return opaque_tag in _OPAQUE_TAG.findall(header)


def json_with_etag(request: Request, payload: dict, status: int = 200) -> HTTPResponse:
    """Serialize `payload` once and tag it with a strong ETag, the SHA-256 of the body.

    Return 304 with no body when the request is a GET or HEAD, `status` is 2xx and
    If-None-Match names this ETag or is "*". Other methods ignore If-None-Match, because
    for them RFC 9110 requires 412 Precondition Failed and no handler here needs that.
    """
    response = json(payload, status=status)
    opaque_tag = hashlib.sha256(response.body).hexdigest()
    etag = f'"{opaque_tag}"'

    cacheable = request.method in _CONDITIONAL_METHODS and 200 <= status < 300
    if cacheable and _if_none_match_matches(request, opaque_tag):
        return HTTPResponse(status=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})

    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response
