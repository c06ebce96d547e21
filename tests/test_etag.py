"""Strong ETags and 304 Not Modified responses for JSON reads."""

from __future__ import annotations

import hashlib

import pytest
from sanic import Request, Sanic

from miniprogram_api.etag import CACHE_CONTROL, json_with_etag
from tests.factories import login_resident, make_city, request_body

PAYLOAD = {"id": 7, "status": "matching", "address": "思明区厦禾路100号"}


def _etag_app() -> Sanic:
    app = Sanic("etag_test")

    @app.route("/thing", methods=["GET", "POST"])
    async def thing(request: Request):
        return json_with_etag(request, PAYLOAD)

    @app.get("/created")
    async def created(request: Request):
        return json_with_etag(request, PAYLOAD, status=201)

    @app.get("/missing")
    async def missing(request: Request):
        return json_with_etag(request, {"error": {"code": "not_found"}}, status=404)

    return app


async def _current_etag(client, path: str = "/thing") -> str:
    _, response = await client.get(path)
    return response.headers["etag"]


async def test_etag_is_strong_hash_of_body():
    _, response = await _etag_app().asgi_client.get("/thing")
    assert response.status == 200
    assert response.json == PAYLOAD
    assert response.headers["etag"] == '"' + hashlib.sha256(response.body).hexdigest() + '"'
    assert response.headers["cache-control"] == CACHE_CONTROL


async def test_etag_match_gives_304_without_body():
    client = _etag_app().asgi_client
    etag = await _current_etag(client)

    _, response = await client.get("/thing", headers={"If-None-Match": etag})

    assert response.status == 304
    assert response.body == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == CACHE_CONTROL


@pytest.mark.parametrize(
    "template",
    [
        "W/{etag}",
        '"stale", {etag}',
        '"stale",W/{etag} , "older"',
        "*",
        " * ",
    ],
)
async def test_etag_if_none_match_forms(template):
    client = _etag_app().asgi_client
    etag = await _current_etag(client)

    _, response = await client.get("/thing", headers={"If-None-Match": template.format(etag=etag)})

    assert response.status == 304


@pytest.mark.parametrize(
    "if_none_match",
    ['"stale"', 'W/"stale", "older"', "", "unquoted-tag", '"a,b"'],
)
async def test_etag_mismatch_gives_full_body(if_none_match):
    _, response = await _etag_app().asgi_client.get("/thing", headers={"If-None-Match": if_none_match})
    assert response.status == 200
    assert response.json == PAYLOAD


async def test_etag_unquoted_match_ignored():
    client = _etag_app().asgi_client
    etag = await _current_etag(client)
    _, response = await client.get("/thing", headers={"If-None-Match": etag.strip('"')})
    assert response.status == 200


async def test_etag_ignored_for_post():
    client = _etag_app().asgi_client
    etag = await _current_etag(client)
    _, response = await client.post("/thing", headers={"If-None-Match": etag})
    assert response.status == 200
    assert response.json == PAYLOAD


async def test_etag_other_2xx_status_kept():
    client = _etag_app().asgi_client
    etag = await _current_etag(client, "/created")
    _, fresh = await client.get("/created")
    _, matched = await client.get("/created", headers={"If-None-Match": etag})
    assert fresh.status == 201
    assert matched.status == 304


async def test_etag_error_status_never_304():
    client = _etag_app().asgi_client
    etag = await _current_etag(client, "/missing")
    _, response = await client.get("/missing", headers={"If-None-Match": etag})
    assert response.status == 404
    assert response.json == {"error": {"code": "not_found"}}


async def test_read_request_304_round_trip(client):
    await make_city()
    headers, _ = await login_resident(client)
    _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)
    path = f"/api/v1/service-requests/{created.json['id']}"

    _, first = await client.get(path, headers=headers)
    _, second = await client.get(path, headers={**headers, "If-None-Match": first.headers["etag"]})

    assert first.status == 200
    assert first.headers["cache-control"] == CACHE_CONTROL
    assert second.status == 304
    assert second.body == b""
    assert second.headers["etag"] == first.headers["etag"]


async def test_read_request_changed_gets_new_etag(client):
    await make_city()
    headers, _ = await login_resident(client)
    _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)
    path = f"/api/v1/service-requests/{created.json['id']}"
    _, before = await client.get(path, headers=headers)

    _, cancelled = await client.post(f"{path}/cancel", headers=headers)
    _, after = await client.get(path, headers={**headers, "If-None-Match": before.headers["etag"]})

    assert cancelled.status == 200
    assert after.status == 200
    assert after.json["status"] == "cancelled"
    assert after.headers["etag"] != before.headers["etag"]
