"""Workload identity without shared secrets: a service registers the public half of an Ed25519 key
and authenticates with `private_key_jwt` client assertions (RFC 7523) signed by PyJWT. Each
assertion works once, only for this server, and only for a few minutes."""

from __future__ import annotations

import time
import uuid

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from conftest import HTTP_TIMEOUT_S

DATA_READER = "d57506d4-4c8d-48b1-8587-93c323f6a5a3"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _admin(server, method: str, path: str, **kwargs) -> requests.Response:
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    return requests.request(
        method,
        server.endpoint + path,
        headers={"Authorization": f"Bearer {token}"},
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
        **kwargs,
    )


def _token_with(server, assertion: str, client_id: str | None = None) -> requests.Response:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    if client_id:
        form["client_id"] = client_id
    return requests.post(server.token_endpoint, data=form, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)


def test_a_service_authenticates_with_a_signed_assertion_and_no_secret(server):
    created = _admin(server, "POST", "/admin/identities",
                     json={"kind": "serviceAccount", "name": f"historian-{uuid.uuid4().hex[:6]}"})
    assert created.status_code == 201, created.text
    client_id = created.json()["identity"]["id"]
    assert _admin(server, "POST", "/admin/roleassignments",
                  json={"principalId": client_id, "roleId": DATA_READER}).status_code == 201

    key = ed25519.Ed25519PrivateKey.generate()
    public = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    public.update({"kid": "historian-1", "use": "sig", "alg": "EdDSA"})
    registered = _admin(server, "PUT", f"/admin/identities/{client_id}/keys", json={"keys": [public]})
    assert registered.status_code == 204, registered.text
    # A private key is never accepted as a registration.
    private = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    private["kid"] = "oops"
    assert _admin(server, "PUT", f"/admin/identities/{client_id}/keys",
                  json={"keys": [private]}).status_code == 400

    def assertion(signer=key, kid="historian-1", **overrides) -> str:
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": server.token_endpoint,
                  "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
        claims.update(overrides)
        return jwt.encode(claims, signer, algorithm="EdDSA", headers={"kid": kid})

    first = assertion()
    ok = _token_with(server, first, client_id)
    assert ok.status_code == 200, ok.text
    access = ok.json()["access_token"]
    models = requests.get(f"{server.endpoint}/models?api-version=2023-10-31",
                          headers={"Authorization": f"Bearer {access}"}, verify=server.ca_path,
                          timeout=HTTP_TIMEOUT_S)
    assert models.status_code == 200

    # Each forgery is judged on its own: a good assertion before it resets the address's
    # failure backoff, which would otherwise answer 429 without checking anything.
    forgeries = {
        "replayed assertion": lambda: first,
        "another server's audience": lambda: assertion(aud="https://elsewhere.test/oauth2/token"),
        "valid for an hour": lambda: assertion(exp=int(time.time()) + 3600),
        "expired": lambda: assertion(exp=int(time.time()) - 120),
        "no jti": lambda: assertion(jti=None),
        "signed by another key": lambda: assertion(signer=ed25519.Ed25519PrivateKey.generate()),
        "unknown kid": lambda: assertion(kid="historian-2"),
        "subject is someone else": lambda: assertion(sub=str(uuid.uuid4())),
    }
    wrong = {}
    for name, forge in forgeries.items():
        assert _token_with(server, assertion()).status_code == 200
        status = _token_with(server, forge()).status_code
        if status != 401:
            wrong[name] = status
    assert _token_with(server, assertion()).status_code == 200
    status = _token_with(server, assertion(), client_id=str(uuid.uuid4())).status_code
    if status != 401:
        wrong["client_id disagrees"] = status
    assert wrong == {}, wrong
