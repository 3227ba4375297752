"""People and scoped roles, judged by independent clients: TOTP codes computed by pyotp from the
otpauth URI the server hands out, access tokens decoded by PyJWT, and the official Azure Digital
Twins SDK acting as a client whose role is scoped to one subtree of the graph."""

from __future__ import annotations

import time
import uuid

import jwt
import pyotp
import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from conftest import HTTP_TIMEOUT_S, ClientSecretCredential, client_from_new_address

DATA_READER = "d57506d4-4c8d-48b1-8587-93c323f6a5a3"
OPERATOR = "4a1f8d2c-7e5b-4c93-8b16-3d9e0a6f2c84"
PASSWORD = "a passphrase long enough"


def _admin_token(server) -> str:
    return server.credential().get_token(server.endpoint).token


def _api(server, method: str, path: str, token: str | None = None, via=None,
         **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return (via or server.session()).request(
        method,
        server.endpoint + path,
        headers=headers,
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
        **kwargs,
    )


def _login(server, name: str, password: str, otp: str | None = None, via=None) -> requests.Response:
    form = {"grant_type": "password", "username": name, "password": password}
    if otp is not None:
        form["otp"] = otp
    return _api(server, "POST", "/oauth2/token", data=form, via=via)


def _failing_login(server, name: str, password: str, otp: str | None = None) -> requests.Response:
    """A login expected to fail, from an address of its own (see `client_from_new_address`)."""
    return _login(server, name, password, otp, via=client_from_new_address(server))


def _create(server, admin: str, body: dict) -> dict:
    r = _api(server, "POST", "/admin/identities", admin, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _assign(server, admin: str, principal: str, role: str, scope: dict | None = None) -> None:
    body = {"principalId": principal, "roleId": role}
    if scope is not None:
        body["scope"] = scope
    r = _api(server, "POST", "/admin/roleassignments", admin, json=body)
    assert r.status_code == 201, r.text


def test_totp_codes_from_pyotp_log_in_and_each_works_once(server):
    admin = _admin_token(server)
    name = f"operator-{uuid.uuid4().hex[:8]}"
    person = _create(server, admin, {"kind": "user", "name": name, "password": PASSWORD})
    _assign(server, admin, person["identity"]["id"], OPERATOR)

    first = _login(server, name, PASSWORD)
    assert first.status_code == 200, first.text
    claims = jwt.decode(first.json()["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["pwd"]

    # An operator holds privileged actions: the password alone does not enrol a second factor
    # (whoever stole it would enrol theirs), the administrator's one-time code does.
    refused = _api(server, "POST", "/me/mfa/totp", first.json()["access_token"])
    assert refused.status_code == 400, refused.text
    issued = _api(server, "POST", f"/admin/identities/{person['identity']['id']}/mfa/enrolmentcode", admin)
    assert issued.status_code == 201, issued.text
    assert issued.headers["Cache-Control"] == "no-store"
    enrolment = _api(server, "POST", "/me/mfa/totp", first.json()["access_token"],
                     json={"enrolmentCode": issued.json()["enrolmentCode"]})
    assert enrolment.status_code == 200, enrolment.text
    # pyotp parses the URI an authenticator app would scan, independently of the server.
    totp = pyotp.parse_uri(enrolment.json()["otpauthUri"])
    assert isinstance(totp, pyotp.TOTP)
    assert totp.secret == enrolment.json()["secret"]
    # One code, kept: `totp.now()` again may be the next step's, which nobody spent.
    spent = totp.now()
    confirmed = _api(
        server, "POST", "/me/mfa/totp/confirm", first.json()["access_token"], json={"code": spent}
    )
    assert confirmed.status_code == 200, confirmed.text
    recovery = confirmed.json()["recoveryCodes"]
    assert len(recovery) == 10

    # The confirmation spent the current code; the next step's code (within the skew) logs in.
    assert _failing_login(server, name, PASSWORD, spent).status_code == 400
    next_code = totp.at(time.time() + 30)
    ok = _login(server, name, PASSWORD, next_code)
    assert ok.status_code == 200, ok.text
    claims = jwt.decode(ok.json()["access_token"], options={"verify_signature": False})
    assert "mfa" in claims["amr"] and "otp" in claims["amr"]
    assert abs(claims["auth_time"] - time.time()) < 60
    replay = _failing_login(server, name, PASSWORD, next_code)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    # Without a code, and with a wrong one, the answer is the same as a wrong password.
    assert (_failing_login(server, name, PASSWORD).json()
            == _failing_login(server, name, "wrong passphrase!").json())
    # A recovery code works once.
    assert _login(server, name, PASSWORD, recovery[0]).status_code == 200
    assert _failing_login(server, name, PASSWORD, recovery[0]).status_code == 400


def test_the_official_sdk_scoped_to_a_subtree_sees_nothing_outside_it(server):
    admin_client = server.client()
    suffix = uuid.uuid4().hex[:8]
    model_id = f"dtmi:scoped:Space{suffix};1"
    admin_client.create_models(
        [
            {
                "@context": "dtmi:dtdl:context;3",
                "@id": model_id,
                "@type": "Interface",
                "contents": [
                    {"@type": "Property", "name": "name", "schema": "string"},
                    {"@type": "Relationship", "name": "contains"},
                ],
            }
        ]
    )
    site, inside, outside = (f"{n}-{suffix}" for n in ("site", "inside", "outside"))
    for twin in (site, inside, outside):
        admin_client.upsert_digital_twin(twin, {"$metadata": {"$model": model_id}, "name": twin})
    admin_client.upsert_relationship(
        site, f"c-{suffix}", {"$targetId": inside, "$relationshipName": "contains"}
    )

    admin = _admin_token(server)
    app = _create(server, admin, {"kind": "application", "name": f"scoped-{suffix}"})
    _assign(
        server,
        admin,
        app["identity"]["id"],
        DATA_READER,
        {"kind": "subtree", "root": site, "relationships": ["contains"]},
    )
    credential = ClientSecretCredential(
        server.token_endpoint, app["identity"]["id"], app["clientSecret"], server.ca_path, server.session()
    )
    scoped = server.client(credential)

    assert scoped.get_digital_twin(inside)["name"] == inside
    with pytest.raises(ResourceNotFoundError) as hidden:
        scoped.get_digital_twin(outside)
    with pytest.raises(ResourceNotFoundError) as absent:
        scoped.get_digital_twin(f"nothing-{suffix}")
    assert hidden.value.error.code == absent.value.error.code
    assert hidden.value.error.message.replace(outside, "?") == absent.value.error.message.replace(
        f"nothing-{suffix}", "?"
    )
    with pytest.raises(ResourceNotFoundError):
        list(scoped.list_relationships(outside))

    found = {t["$dtId"] for t in scoped.query_twins("SELECT * FROM DIGITALTWINS")}
    assert found == {site, inside}
    count = list(scoped.query_twins("SELECT COUNT() FROM DIGITALTWINS"))
    assert count == [{"COUNT": 2}]
    assert list(scoped.query_twins(f"SELECT * FROM DIGITALTWINS WHERE $dtId = '{outside}'")) == []

    # Read-only in its subtree: a write is refused even there.
    with pytest.raises(HttpResponseError) as refused:
        scoped.update_digital_twin(inside, [{"op": "replace", "path": "/name", "value": "x"}])
    assert refused.value.status_code == 403
