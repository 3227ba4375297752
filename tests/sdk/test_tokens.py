"""twinguard's access tokens judged by PyJWT, an independent JOSE implementation: they verify
against the published JWKS with the claims RFC 9068 asks for, and a tampered one does not."""

from __future__ import annotations

import ssl

import jwt
import pytest
import requests


def _get(server, path):
    response = requests.get(f"{server.endpoint}{path}", verify=server.ca_path, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_discovery_metadata_points_at_the_token_endpoint_and_the_jwks(server):
    metadata = _get(server, "/.well-known/openid-configuration")
    assert metadata["token_endpoint"] == f"{server.endpoint}/oauth2/token"
    assert metadata["jwks_uri"] == f"{server.endpoint}/.well-known/jwks.json"
    assert metadata["grant_types_supported"] == ["client_credentials", "password", "refresh_token"]
    assert metadata["revocation_endpoint"] == f"{server.endpoint}/oauth2/revoke"
    assert {"private_key_jwt", "tls_client_auth"} <= set(metadata["token_endpoint_auth_methods_supported"])
    assert _get(server, "/.well-known/oauth-authorization-server") == metadata


def test_access_tokens_verify_with_pyjwt_against_the_published_jwks(server):
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    metadata = _get(server, "/.well-known/openid-configuration")
    context = ssl.create_default_context(cafile=server.ca_path)
    signing_key = jwt.PyJWKClient(metadata["jwks_uri"], ssl_context=context).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        signing_key.key,
        algorithms=["EdDSA"],
        audience="https://digitaltwins.azure.net",
        issuer=metadata["issuer"],
        options={"require": ["exp", "nbf", "iat", "iss", "aud", "sub", "jti", "client_id"]},
    )
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert claims["sub"] == claims["client_id"]
    assert claims["exp"] - claims["iat"] <= 3600


def test_a_token_with_one_changed_claim_fails_pyjwt_verification(server):
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    header, payload, signature = token.split(".")
    claims = jwt.utils.base64url_decode(payload)
    forged_payload = jwt.utils.base64url_encode(claims.replace(b'"sub":"', b'"sub":"x')).decode()
    forged = f"{header}.{forged_payload}.{signature}"
    jwks = _get(server, "/.well-known/jwks.json")
    key = jwt.PyJWK(jwks["keys"][0]).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key, algorithms=["EdDSA"], audience="https://digitaltwins.azure.net", options={"verify_iss": False})


def test_jwt_attack_payloads_are_refused_by_the_server(server):
    """The classic attacks on JWT validation, built with PyJWT and `cryptography` and sent to the
    server itself (not judged by PyJWT): each must answer 401 where the genuine token gets 200."""
    import base64
    import json
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    jwks = _get(server, "/.well-known/jwks.json")
    server_x = next(k for k in jwks["keys"] if k["kid"] == header["kid"])["x"]
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_jwk = jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    public_pem = ed25519.Ed25519PublicKey.from_public_bytes(
        base64.urlsafe_b64decode(server_x + "=" * (-len(server_x) % 4))
    ).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def raw(head: dict, body: dict, signature: bytes = b"") -> str:
        return f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"

    def hmac_signed(secret: bytes, body: dict = claims) -> str:
        import hashlib
        import hmac

        head = {"alg": "HS256", "typ": "at+jwt", "kid": header["kid"]}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}"
        digest = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(digest)}"

    def by_attacker(extra_header: dict | None = None, **overrides) -> str:
        body = {**claims, **overrides}
        return jwt.encode(body, attacker, algorithm="EdDSA",
                          headers={"typ": "at+jwt", "kid": header["kid"], **(extra_header or {})})

    head, payload, signature = token.split(".")
    forged_sub = b64(json.dumps({**claims, "sub": "someone-else"}).encode())
    now = int(time.time())
    attacks = {
        "alg none": raw({"alg": "none", "typ": "at+jwt"}, claims),
        "alg None, kid kept": raw({"alg": "None", "typ": "at+jwt", "kid": header["kid"]}, claims),
        "HS256 keyed with the public key PEM": hmac_signed(public_pem),
        "HS256 keyed with the raw public key": hmac_signed(base64.urlsafe_b64decode(server_x + "=" * (-len(server_x) % 4))),
        "HS256 keyed with the JWKS x string": hmac_signed(server_x.encode()),
        "a claim changed, signature kept": f"{head}.{forged_sub}.{signature}",
        "signature stripped": f"{head}.{payload}.",
        "signature of another token": f"{head}.{payload}.{b64(bytes(64))}",
        "attacker key under the server's kid": by_attacker(),
        "attacker key embedded as jwk": by_attacker({"jwk": attacker_jwk}),
        "attacker JWKS by jku": by_attacker({"jku": "https://127.0.0.1:1/jwks.json"}),
        "attacker certificate by x5u": by_attacker({"x5u": "https://127.0.0.1:1/cert.pem"}),
        "kid path traversal": by_attacker({"kid": "../../../../dev/null"}),
        "kid SQL injection": by_attacker({"kid": "' OR '1'='1"}),
        "attacker key, far future": by_attacker(exp=now + 10 * 365 * 86400),
        "critical header the server cannot understand": raw({**header, "crit": ["exp"]}, claims, b"x" * 64),
        "oversize": raw(header, {**claims, "pad": "x" * 10_000}, b"x" * 64),
        "empty": "",
        "three dots": "...",
    }
    genuine = requests.get(f"{server.endpoint}/models?api-version=2023-10-31",
                           headers={"Authorization": f"Bearer {token}"}, verify=server.ca_path, timeout=30)
    assert genuine.status_code == 200
    accepted = {}
    for name, forged in attacks.items():
        r = requests.get(f"{server.endpoint}/models?api-version=2023-10-31",
                         headers={"Authorization": f"Bearer {forged}", "Connection": "close"},
                         verify=server.ca_path, timeout=30)
        if r.status_code != 401:
            accepted[name] = r.status_code
    assert accepted == {}, accepted
