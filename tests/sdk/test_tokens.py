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
