"""An external OpenID Connect issuer, written here with PyJWT and cryptography: it serves a JWKS
on loopback and mints good and bad tokens. twinguard trusts it through `--issuers`; every class of
the JWT attack catalogue must be refused, and the good tokens must map to the configured roles and
groups. A second configured issuer signs with ES256, to show that each issuer's keys stay its own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import HTTP_TIMEOUT_S, serve_shared

DATA_READER = "d57506d4-4c8d-48b1-8587-93c323f6a5a3"
ADT_AUDIENCE = "https://digitaltwins.azure.net"
ISSUER_A = "https://idp-a.test/realms/plant"
ISSUER_B = "https://idp-b.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Keys:
    def __init__(self):
        self.a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.b = ec.generate_private_key(ec.SECP256R1())
        self.attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @staticmethod
    def jwk(private_key, kid: str, alg: str) -> dict:
        public = private_key.public_key()
        if alg.startswith("RS"):
            d = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            d = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        d.update({"kid": kid, "alg": alg, "use": "sig"})
        return d


class IdentityProvider:
    """Serves /a/jwks.json, /b/jwks.json and an attacker's /evil.json, and counts fetches."""

    def __init__(self, keys: Keys):
        self.keys = keys
        self.fetches: dict[str, int] = {}
        documents = {
            "/a/jwks.json": {"keys": [Keys.jwk(keys.a, "a1", "RS256")]},
            "/b/jwks.json": {"keys": [Keys.jwk(keys.b, "b1", "ES256")]},
            "/evil.json": {"keys": [Keys.jwk(keys.attacker, "a1", "RS256")]},
        }
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                provider.fetches[self.path] = provider.fetches.get(self.path, 0) + 1
                doc = documents.get(self.path)
                body = json.dumps(doc).encode() if doc else b"{}"
                self.send_response(200 if doc else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def idp():
    provider = IdentityProvider(Keys())
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def oidc_server(tmp_path_factory, idp):
    config = tmp_path_factory.mktemp("issuers") / "issuers.json"
    config.write_text(
        json.dumps(
            [
                {
                    "issuer": ISSUER_A,
                    "jwksUri": f"{idp.base}/a/jwks.json",
                    "audiences": [ADT_AUDIENCE],
                    "algorithms": ["RS256"],
                    "claims": {"subject": "sub", "groups": "groups", "roles": "realm_access.roles"},
                    "roleMap": {"twin-reader": DATA_READER},
                    "groupMap": {"/plant/building-1": "building-1-readers"},
                },
                {
                    "issuer": ISSUER_B,
                    "jwksUri": f"{idp.base}/b/jwks.json",
                    "audiences": [ADT_AUDIENCE],
                    "algorithms": ["ES256"],
                    "principalKind": "application",
                    "claims": {"roles": "roles"},
                    "roleMap": {"reader": DATA_READER},
                },
            ]
        )
    )
    yield from serve_shared(tmp_path_factory, ("--issuers", str(config)))


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {
        "iss": ISSUER_A,
        "sub": "operator-7",
        "aud": ADT_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "realm_access": {"roles": ["twin-reader"]},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign_a(keys: Keys, payload: dict, headers: dict | None = None) -> str:
    return jwt.encode(payload, keys.a, algorithm="RS256", headers={"kid": "a1", **(headers or {})})


def unsigned(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)])


def get_models(server, token: str) -> int:
    r = requests.get(
        f"{server.endpoint}/models?api-version=2023-10-31",
        headers={"Authorization": f"Bearer {token}"},
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )
    return r.status_code


def self_signed_cert(key) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def test_tokens_of_a_trusted_issuer_map_to_roles(oidc_server, idp):
    good = sign_a(idp.keys, claims())
    assert get_models(oidc_server, good) == 200
    # Data Reader, mapped from the realm role: writes are refused.
    r = requests.post(
        f"{oidc_server.endpoint}/models?api-version=2023-10-31",
        headers={"Authorization": f"Bearer {good}"},
        json=[],
        verify=oidc_server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 403
    # The second issuer's own ES256 token works with its own mapping.
    now = int(time.time())
    b_token = jwt.encode(
        {"iss": ISSUER_B, "sub": "svc-9", "aud": ADT_AUDIENCE, "iat": now, "nbf": now, "exp": now + 300,
         "roles": ["reader"]},
        idp.keys.b,
        algorithm="ES256",
        headers={"kid": "b1"},
    )
    assert get_models(oidc_server, b_token) == 200
    # No mapped role, no access.
    assert get_models(oidc_server, sign_a(idp.keys, claims(realm_access={"roles": ["other"]}))) == 403


def test_external_groups_map_to_directory_groups_with_scoped_assignments(oidc_server, idp):
    admin = oidc_server.credential().get_token(ADT_AUDIENCE).token
    auth = {"Authorization": f"Bearer {admin}"}
    # One session for the administrator's writes and the member's reads: through a cluster it
    # presents the position of the last write (`docs/consistency.md`).
    session = oidc_server.session()

    def call(method, path, **kw):
        return session.request(method, oidc_server.endpoint + path, headers=auth,
                                verify=oidc_server.ca_path, timeout=HTTP_TIMEOUT_S, **kw)

    suffix = uuid.uuid4().hex[:6]
    model = f"dtmi:ext:Space{suffix};1"
    assert call("POST", "/models?api-version=2023-10-31", json=[{
        "@context": "dtmi:dtdl:context;3", "@id": model, "@type": "Interface",
        "contents": [{"@type": "Relationship", "name": "contains"}]}]).status_code == 201
    for twin in ("b1", "b2"):
        assert call("PUT", f"/digitaltwins/{twin}-{suffix}?api-version=2023-10-31",
                    json={"$metadata": {"$model": model}}).status_code == 200
    group = call("POST", "/admin/identities", json={"kind": "group", "name": "building-1-readers"})
    assert group.status_code == 201, group.text
    assigned = call("POST", "/admin/roleassignments", json={
        "principalId": group.json()["identity"]["id"], "roleId": DATA_READER,
        "scope": {"kind": "subtree", "root": f"b1-{suffix}", "relationships": ["contains"]}})
    assert assigned.status_code == 201, assigned.text

    member = sign_a(idp.keys, claims(realm_access=None, groups=["/plant/building-1"]))

    def twin(token, twin_id):
        return session.get(f"{oidc_server.endpoint}/digitaltwins/{twin_id}?api-version=2023-10-31",
                            headers={"Authorization": f"Bearer {token}"}, verify=oidc_server.ca_path,
                            timeout=HTTP_TIMEOUT_S).status_code

    assert twin(member, f"b1-{suffix}") == 200
    assert twin(member, f"b2-{suffix}") == 404


def test_the_jwt_attack_catalogue_is_refused(oidc_server, idp):
    keys = idp.keys
    good_claims = claims()
    good = sign_a(keys, good_claims)
    assert get_models(oidc_server, good) == 200, "the harness's good token must pass"
    header, payload, signature = good.split(".")
    public_pem = keys.a.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "a1"}).encode())
    hs_input = f"{hs_header}.{payload}".encode()
    attacker_jwk = Keys.jwk(keys.attacker, "a1", "RS256")
    other_issuer = jwt.encode(
        claims(iss="https://idp-c.test"), rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256", headers={"kid": "c1"},
    )
    now = int(time.time())
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    cases = {
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, good_claims),
        "alg none with a kid": unsigned({"alg": "none", "kid": "a1"}, good_claims),
        "HS256 signed with the RSA public key": f"{hs_header}.{payload}."
        + b64(hmac.new(public_pem, hs_input, hashlib.sha256).digest()),
        "wrong kid": jwt.encode(good_claims, keys.a, algorithm="RS256", headers={"kid": "a9"}),
        "missing kid": jwt.encode(good_claims, keys.a, algorithm="RS256"),
        "jku to the attacker's keys": jwt.encode(
            good_claims, keys.attacker, algorithm="RS256",
            headers={"kid": "a1", "jku": f"{idp.base}/evil.json"}),
        "x5u to the attacker's keys": jwt.encode(
            good_claims, keys.attacker, algorithm="RS256",
            headers={"kid": "a1", "x5u": f"{idp.base}/evil.json"}),
        "embedded jwk": jwt.encode(
            good_claims, keys.attacker, algorithm="RS256", headers={"kid": "a1", "jwk": attacker_jwk}),
        "embedded x5c": jwt.encode(
            good_claims, keys.attacker, algorithm="RS256",
            headers={"kid": "a1", "x5c": [self_signed_cert(keys.attacker)]}),
        "expired": sign_a(keys, claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200)),
        "nbf in the future": sign_a(keys, claims(nbf=now + 3600)),
        "iat in the future": sign_a(keys, claims(iat=now + 3600)),
        "auth_time in the future (step-up for ever)": sign_a(keys, claims(auth_time=now + 3600)),
        "exp missing": sign_a(keys, {k: v for k, v in good_claims.items() if k != "exp"}),
        "iat missing": sign_a(keys, {k: v for k, v in good_claims.items() if k != "iat"}),
        "wrong iss": sign_a(keys, claims(iss="https://idp-a.test/realms/other")),
        "wrong aud": sign_a(keys, claims(aud="https://management.azure.com")),
        "stripped signature": f"{header}.{payload}.",
        "altered signature": f"{header}.{payload}.{flipped}",
        "altered payload": f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}",
        "oversize token": sign_a(keys, claims(padding="x" * 9000)),
        "another issuer's valid token": other_issuer,
        "issuer B's key claiming issuer A": jwt.encode(
            good_claims, keys.b, algorithm="ES256", headers={"kid": "b1"}),
        "exp as a string (CVE-2026-25537 class)": sign_a(keys, claims(exp=str(now + 300))),
        "nbf as a string": sign_a(keys, claims(nbf=str(now))),
        "iat as a string": sign_a(keys, claims(iat=str(now))),
        "sub as a number": sign_a(keys, claims(sub=7)),
        "roles as a string": sign_a(keys, claims(realm_access={"roles": "twin-reader"})),
        "aud as a number": sign_a(keys, claims(aud=42)),
    }
    accepted = [name for name, token in cases.items() if get_models(oidc_server, token) != 401]
    assert accepted == [], f"accepted: {accepted}"
    # Header URLs were never followed.
    assert idp.fetches.get("/evil.json", 0) == 0
