"""Workload identity without shared secrets: a service registers the public half of an Ed25519 key
and authenticates with `private_key_jwt` client assertions (RFC 7523) signed by PyJWT. Each
assertion works once, only for this server, and only for a few minutes."""

from __future__ import annotations

import time
import uuid

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from conftest import HTTP_TIMEOUT_S, client_from_new_address

DATA_READER = "d57506d4-4c8d-48b1-8587-93c323f6a5a3"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _admin(server, method: str, path: str, **kwargs) -> requests.Response:
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    return server.session().request(
        method,
        server.endpoint + path,
        headers={"Authorization": f"Bearer {token}"},
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
        **kwargs,
    )


def _token_with(server, assertion: str, client_id: str | None = None, via=None) -> requests.Response:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    if client_id:
        form["client_id"] = client_id
    return (via or server.session()).post(server.token_endpoint, data=form, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)


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
    models = server.session().get(f"{server.endpoint}/models?api-version=2023-10-31",
                          headers={"Authorization": f"Bearer {access}"}, verify=server.ca_path,
                          timeout=HTTP_TIMEOUT_S)
    assert models.status_code == 200

    # Each forgery is judged on its own, from an address of its own: a success clears no
    # failure, so forgeries from one address would soon be answered 429 without any check.
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
        status = _token_with(server, forge(), via=client_from_new_address(server)).status_code
        if status != 401:
            wrong[name] = status
    assert _token_with(server, assertion()).status_code == 200
    status = _token_with(server, assertion(), client_id=str(uuid.uuid4()),
                         via=client_from_new_address(server)).status_code
    if status != 401:
        wrong["client_id disagrees"] = status
    assert wrong == {}, wrong


def _csr_and_key(tmp_path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        # Asked-for names and usages are ignored: the CA decides what the certificate says.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("admin.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path = tmp_path / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_path


def test_a_service_authenticates_with_a_client_certificate_of_the_instance_ca(server, tmp_path):
    from cryptography import x509

    created = _admin(server, "POST", "/admin/identities",
                     json={"kind": "serviceAccount", "name": f"pump-ctl-{uuid.uuid4().hex[:6]}"})
    client_id = created.json()["identity"]["id"]
    assert _admin(server, "POST", "/admin/roleassignments",
                  json={"principalId": client_id, "roleId": DATA_READER}).status_code == 201
    csr, key_path = _csr_and_key(tmp_path, "pump-ctl")
    issued = _admin(server, "POST", f"/admin/identities/{client_id}/certificates", json={"csr": csr})
    assert issued.status_code == 201, issued.text
    cert_pem = issued.json()["certificate"]
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:twinguard:identity:{client_id}"]
    assert sans.get_values_for_type(x509.DNSName) == []
    cert_path = tmp_path / "pump-ctl.pem"
    cert_path.write_text(cert_pem)
    mtls = (str(cert_path), str(key_path))

    def token(client=client_id, cert=mtls, via=None):
        return (via or server.session()).post(server.token_endpoint, data={"grant_type": "client_credentials", "client_id": client},
                        cert=cert, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)

    ok = token()
    assert ok.status_code == 200, ok.text
    access = ok.json()["access_token"]
    models = server.session().get(f"{server.endpoint}/models?api-version=2023-10-31",
                          headers={"Authorization": f"Bearer {access}"}, verify=server.ca_path,
                          timeout=HTTP_TIMEOUT_S)
    assert models.status_code == 200
    # Without the certificate, or claiming another client, nothing.
    assert token(cert=None, via=client_from_new_address(server)).status_code == 401
    assert token(client=str(uuid.uuid4()), via=client_from_new_address(server)).status_code == 401

    # The workload renews its own certificate with the token its certificate got it, presenting
    # that certificate (proof of possession): the token alone, say a stolen copy, cannot.
    csr2, key2 = _csr_and_key(tmp_path, "pump-ctl-2")
    renew = dict(json={"csr": csr2}, headers={"Authorization": f"Bearer {access}"},
                 verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
    assert server.session().post(f"{server.endpoint}/me/certificate", **renew).status_code == 403
    renewed = server.session().post(f"{server.endpoint}/me/certificate", cert=mtls, **renew)
    assert renewed.status_code == 201, renewed.text

    # Revoking the first certificate stops it at once.
    serial = issued.json()["serial"]
    assert _admin(server, "DELETE", f"/admin/identities/{client_id}/certificates/{serial}").status_code == 204
    assert token(via=client_from_new_address(server)).status_code == 401
    second = tmp_path / "pump-ctl-2.pem"
    second.write_text(renewed.json()["certificate"])
    assert token(cert=(str(second), str(key2))).status_code == 200


def test_a_certificate_not_issued_by_the_instance_ca_fails_the_handshake(server, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    now = datetime.datetime.now(datetime.timezone.utc)
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twinguard local CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"urn:twinguard:identity:{server.client_id}")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged.pem", tmp_path / "forged.key"
    cert_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    try:
        r = requests.post(server.token_endpoint,
                          data={"grant_type": "client_credentials", "client_id": server.client_id},
                          cert=(str(cert_path), str(key_path)), verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
    except requests.exceptions.SSLError:
        return
    except requests.exceptions.ConnectionError:
        return
    raise AssertionError(f"a forged client certificate got an answer: {r.status_code} {r.text}")
