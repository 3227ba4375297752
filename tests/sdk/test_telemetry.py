"""Signed telemetry judged by independent libraries: messages signed by pycose (COSE_Sign1) and
jwcrypto (JWS), with keys made by `cryptography`, go to the device plane over HTTPS and through a
real Mosquitto broker; the same messages tampered in one byte, re-signed with another key,
replayed, reordered beyond the window, or from a revoked device are refused, each with its
reason code and a metric. The twin is read back with the official ADT SDK."""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import shutil
import socket
import subprocess
import time
import uuid

import cbor2
import paho.mqtt.client as mqtt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwcrypto import jwk, jws
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.algorithms import EdDSA
from pycose.messages import Sign1Message

from conftest import HTTP_TIMEOUT_S, _serve, free_port, make_test_ca, serve_shared, single_node_only

MODEL = "dtmi:example:telemetry:Boiler;1"
FIRMWARE = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
WINDOW = 1024
OPERATOR = "4a1f8d2c-7e5b-4c93-8b16-3d9e0a6f2c84"


class Device:
    """A device as a vendor would build it, with nothing from twinguard."""

    def __init__(self, device_id: str):
        self.id = device_id
        self.key = Ed25519PrivateKey.generate()
        self.seq = int(time.time() * 1000)

    def public_pem(self) -> str:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def payload(self, twin: str, name: str, value, seq: int | None = None, at_ms: int | None = None) -> dict:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return {
            "device": self.id,
            "seq": seq,
            "time": at_ms if at_ms is not None else int(time.time() * 1000),
            "firmware": FIRMWARE,
            "readings": [{"twin": twin, "name": name, "value": value}],
        }

    def cose(self, payload: dict, key: Ed25519PrivateKey | None = None) -> bytes:
        private = (key or self.key).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        msg = Sign1Message(phdr={Algorithm: EdDSA, KID: self.id.encode()}, payload=cbor2.dumps(payload))
        msg.key = OKPKey(crv=Ed25519, d=private)
        return msg.encode(tag=True)

    def jws(self, payload: dict) -> str:
        key = jwk.JWK.from_pyca(self.key)
        token = jws.JWS(json.dumps(payload).encode())
        token.add_signature(key, alg="EdDSA", protected=json.dumps({"alg": "EdDSA", "kid": self.id}))
        return token.serialize(compact=True)


@pytest.fixture(scope="module")
def mqtt_topic():
    return f"twinguard-test/{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def tserver(tmp_path_factory, mqtt_topic):
    yield from serve_shared(tmp_path_factory, ("--mqtt-url", "mqtt://127.0.0.1:1883", "--mqtt-topic", f"{mqtt_topic}/#"))


@pytest.fixture(scope="module")
def api(tserver):
    token = tserver.credential().get_token().token
    session = tserver.session()

    def call(method: str, path: str, body=None, expect=200):
        response = session.request(
            method, f"{tserver.endpoint}{path}", json=body, verify=tserver.ca_path, timeout=HTTP_TIMEOUT_S,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == expect, (path, response.status_code, response.text)
        return response.json() if response.content else None

    return call


@pytest.fixture(scope="module")
def plant(tserver, api):
    client = tserver.client()
    client.create_models([{
        "@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "temperature", "schema": "double"},
            {"@type": "Telemetry", "name": "pressure", "schema": "double"},
        ],
    }])
    client.upsert_digital_twin("boiler-py", {"$metadata": {"$model": MODEL}})
    api("PUT", "/firmware/vendor-x", {"digests": [FIRMWARE]})
    # The first administrator holds Instance Owner (every action), so it may review quarantine and
    # hand the Operator role on; it takes Operator too, as a plant's operator would hold it.
    assert tserver.session().get(f"{tserver.endpoint}/quarantine", verify=tserver.ca_path, timeout=HTTP_TIMEOUT_S,
                        headers={"Authorization": f"Bearer {tserver.credential().get_token().token}"}).status_code == 200
    api("POST", "/admin/roleassignments", {"principalId": tserver.client_id, "roleId": OPERATOR}, expect=201)
    devices = {}
    for name in ["py-cose", "py-jws", "py-mqtt", "py-revoked"]:
        device = Device(name)
        api("PUT", f"/devices/{name}", {
            "publicKey": device.public_pem(), "deviceModel": "vendor-x",
            "bindings": [{"twin": "boiler-py", "names": ["temperature", "pressure"]}],
        }, expect=201)
        devices[name] = device
    return client, devices


def post(tserver, body: bytes | str, content_type: str):
    """To the device plane, presenting the position of the tests' last write (and naming the
    one of this batch, when it is accepted or held), as every other request here."""
    return tserver.session().post(
        f"{tserver.device_endpoint}/telemetry", data=body, headers={"Content-Type": content_type},
        verify=tserver.ca_path, timeout=HTTP_TIMEOUT_S,
    )


def test_pycose_and_jwcrypto_messages_move_the_twin(tserver, plant):
    client, devices = plant
    r = post(tserver, devices["py-cose"].cose(devices["py-cose"].payload("boiler-py", "temperature", 71.5)),
             "application/cose")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"
    twin = client.get_digital_twin("boiler-py")
    assert twin["temperature"] == 71.5
    assert twin["$metadata"]["temperature"]["quality"] == "good"
    assert twin["$metadata"]["temperature"]["sources"] == ["py-cose"]

    r = post(tserver, devices["py-jws"].jws(devices["py-jws"].payload("boiler-py", "temperature", 72.0)),
             "application/jose")
    assert r.status_code == 200, r.text
    assert client.get_digital_twin("boiler-py")["temperature"] == 72.0


def test_a_batch_mixes_both_formats(tserver, plant):
    _, devices = plant
    d = devices["py-cose"]
    batch = {"messages": [
        devices["py-jws"].jws(devices["py-jws"].payload("boiler-py", "pressure", 2.1)),
        base64.b64encode(d.cose(d.payload("boiler-py", "pressure", 2.2))).decode(),
    ]}
    r = tserver.session().post(f"{tserver.device_endpoint}/telemetry", json=batch, verify=tserver.ca_path,
                      timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "accepted"]


def _reason(response) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status"] == "rejected", body
    return body["reason"]


def test_tampered_resigned_replayed_reordered_and_revoked_messages_are_refused(tserver, plant, api):
    client, devices = plant
    d = devices["py-cose"]
    good = d.cose(d.payload("boiler-py", "temperature", 73.0))
    # Tampered in one byte: a payload byte, and a signature byte.
    payload_at = good.index(b"boiler-py")
    for at in (payload_at, len(good) - 1):
        tampered = bytearray(good)
        tampered[at] ^= 0x01
        assert _reason(post(tserver, bytes(tampered), "application/cose")) in {"bad_signature", "malformed"}
    # The same payload signed with a key that is not the device's.
    assert _reason(post(tserver, d.cose(d.payload("boiler-py", "temperature", 99.0), Ed25519PrivateKey.generate()),
                        "application/cose")) == "bad_signature"
    # The genuine message once, then again.
    assert post(tserver, good, "application/cose").status_code == 200
    assert _reason(post(tserver, good, "application/cose")) == "replay"
    # Reordered beyond the window.
    old = d.payload("boiler-py", "temperature", 74.0, seq=d.seq - WINDOW - 5)
    assert _reason(post(tserver, d.cose(old), "application/cose")) == "too_old"
    # A timestamp an hour old.
    stale = d.payload("boiler-py", "temperature", 75.0, at_ms=int(time.time() * 1000) - 3_600_000)
    assert _reason(post(tserver, d.cose(stale), "application/cose")) == "timestamp"
    # A revoked device, at once.
    api("POST", "/devices/py-revoked/revoke")
    r = devices["py-revoked"]
    assert _reason(post(tserver, r.jws(r.payload("boiler-py", "temperature", 1.0)), "application/jose")) == "revoked"
    # TLS alone is not trusted: an unsigned JSON reading is no message.
    assert post(tserver, json.dumps({"device": "py-cose", "value": 1}), "application/jose").status_code == 400
    assert client.get_digital_twin("boiler-py")["temperature"] == 73.0
    # Each refusal is counted by reason.
    scrape = tserver.metrics()
    for reason in ["bad_signature", "replay", "too_old", "timestamp", "revoked"]:
        assert f'reason="{reason}"' in scrape and "twinguard_telemetry_messages_total" in scrape, reason
    # Nothing with a bad signature was stored as data.
    held = api("GET", "/quarantine")["value"]
    assert all(h["value"] != 99.0 for h in held)


def test_out_of_limit_readings_are_held_for_review(tserver, plant, api):
    client, devices = plant
    api("PUT", "/policies/boiler-temp", {"model": MODEL, "property": "temperature", "min": -40, "max": 150,
                                          "unit": "degreeCelsius"})
    d = devices["py-jws"]
    r = post(tserver, d.jws(d.payload("boiler-py", "temperature", 900.0)), "application/jose")
    assert r.status_code == 202, r.text
    assert r.json()["readings"][0]["reasons"] == ["above_max"]
    held = [h for h in api("GET", "/quarantine")["value"] if h["value"] == 900.0]
    assert len(held) == 1 and held[0]["device"] == "py-jws"
    assert client.get_digital_twin("boiler-py")["temperature"] != 900.0
    decided = api("POST", f"/quarantine/{held[0]['id']}/discard")
    assert decided["status"] == "discarded"


def test_messages_through_mosquitto_reach_the_twin(tserver, plant, mqtt_topic):
    client, devices = plant
    d = devices["py-mqtt"]
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"py-{uuid.uuid4().hex[:8]}")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    try:
        # Give the server's subscription a moment to exist, then publish until it is seen.
        deadline = time.monotonic() + 30
        value = 60.0
        while time.monotonic() < deadline:
            value += 0.5
            info = publisher.publish(f"{mqtt_topic}/py-mqtt", d.cose(d.payload("boiler-py", "temperature", value)), qos=1)
            info.wait_for_publish(5)
            time.sleep(0.5)
            twin = client.get_digital_twin("boiler-py")
            if twin["$metadata"]["temperature"]["sources"] == ["py-mqtt"]:
                break
        else:
            pytest.fail("no MQTT message reached the twin within 30 s")
        # A forged message on the same topic is refused: the broker is not trusted.
        forged = d.cose(d.payload("boiler-py", "temperature", -5.0), Ed25519PrivateKey.generate())
        publisher.publish(f"{mqtt_topic}/py-mqtt", forged, qos=1).wait_for_publish(5)
        time.sleep(1.0)
        assert client.get_digital_twin("boiler-py")["temperature"] != -5.0
    finally:
        publisher.loop_stop()
        publisher.disconnect()


@contextlib.contextmanager
def own_broker(directory, tls: bool):
    """A Mosquitto of the test's own on a free port, with TLS (certificates in `directory`) or
    without; yields the port and stops the broker afterwards."""
    port = free_port()
    conf = directory / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             # Run as whoever runs the tests: a broker started as root would otherwise switch to
             # the mosquitto user, who cannot read the test's private directory.
             f"user {getpass.getuser()}"]
    if tls:
        make_test_ca(directory)
        lines += [f"cafile {directory}/ca.pem", f"certfile {directory}/cert.pem", f"keyfile {directory}/key.pem"]
    conf.write_text("\n".join(lines) + "\n")
    log = open(directory / "mosquitto.log", "wb")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"mosquitto did not listen: {(directory / 'mosquitto.log').read_text()}")
        yield port
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        log.close()


def provision(srv, twin: str, device: Device):
    """The model, a twin, the firmware allowlist and `device` bound to the twin's temperature."""
    headers = {"Authorization": f"Bearer {srv.credential().get_token().token}"}
    client = srv.client()
    client.create_models([{"@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
                           "contents": [{"@type": "Property", "name": "temperature", "schema": "double"}]}])
    client.upsert_digital_twin(twin, {"$metadata": {"$model": MODEL}})
    for path, body in [("/firmware/vendor-x", {"digests": [FIRMWARE]}),
                       (f"/devices/{device.id}", {"publicKey": device.public_pem(), "deviceModel": "vendor-x",
                                                  "bindings": [{"twin": twin, "names": ["temperature"]}]})]:
        r = requests.put(f"{srv.endpoint}{path}", json=body, headers=headers, verify=srv.ca_path,
                         timeout=HTTP_TIMEOUT_S)
        assert r.status_code in (200, 201), r.text
    return client


def publish_until_seen(publisher, topic: str, device: Device, client, twin: str, value: float):
    """Publishes `value` until the twin shows it: the server's subscription exists by then."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        publisher.publish(topic, device.cose(device.payload(twin, "temperature", value)), qos=1).wait_for_publish(5)
        time.sleep(0.5)
        if client.get_digital_twin(twin).get("temperature") == value:
            return
    pytest.fail(f"{value} did not reach {twin} through the broker within 30 s")


@single_node_only
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is installed by scripts/test-env.sh")
def test_a_tls_broker_started_here_delivers_to_twinguard(tmp_path_factory):
    """A Mosquitto of the test's own with TLS on a free port: twinguard verifies the broker's
    certificate against the CA it was given, then ingests what the broker delivers."""
    directory = tmp_path_factory.mktemp("mosquitto")
    with own_broker(directory, tls=True) as port:
        gen = _serve(tmp_path_factory, ("--mqtt-url", f"mqtts://localhost:{port}", "--mqtt-ca", str(directory / "ca.pem"),
                                        "--mqtt-topic", "tls-test/#"))
        srv = next(gen)
        try:
            device = Device("tls-1")
            client = provision(srv, "boiler-tls", device)
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-tls")
            publisher.tls_set(ca_certs=str(directory / "ca.pem"))
            publisher.connect("localhost", port)
            publisher.loop_start()
            try:
                publish_until_seen(publisher, "tls-test/tls-1", device, client, "boiler-tls", 42.0)
            finally:
                publisher.loop_stop()
                publisher.disconnect()
        finally:
            gen.close()


@single_node_only
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is installed by scripts/test-env.sh")
def test_readings_published_while_twinguard_is_down_arrive_when_it_is_back(tmp_path_factory):
    """The subscription is a persistent session: the broker keeps what devices publish while
    twinguard is stopped, more messages than the broker sends a subscriber at once, and delivers
    them to the restarted server."""
    directory = tmp_path_factory.mktemp("mosquitto")
    with own_broker(directory, tls=False) as port:
        args = ("--mqtt-url", f"mqtt://127.0.0.1:{port}", "--mqtt-topic", "plant/#")
        gen = _serve(tmp_path_factory, args)
        srv = next(gen)
        device = Device("restart-1")
        try:
            client = provision(srv, "boiler-r", device)
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-restart")
            publisher.connect("127.0.0.1", port)
            publisher.loop_start()
            publish_until_seen(publisher, "plant/restart-1", device, client, "boiler-r", 20.0)
        finally:
            gen.close()
        try:
            payloads = [device.payload("boiler-r", "temperature", 20.0 + (i % 5) * 0.01) for i in range(300)]
            for payload in payloads:
                publisher.publish("plant/restart-1", device.cose(payload), qos=1).wait_for_publish(5)
            gen = _serve(tmp_path_factory, args, data_dir=srv.data_dir)
            srv = next(gen)
            try:
                token = srv.credential().get_token().token
                missing = {p["seq"] for p in payloads}
                deadline = time.monotonic() + 30
                while missing:
                    assert time.monotonic() < deadline, f"{len(missing)} of 300 readings sent while down never arrived"
                    time.sleep(0.2)
                    r = requests.get(f"{srv.endpoint}/history/boiler-r/temperature", params={"limit": 1000},
                                     headers={"Authorization": f"Bearer {token}"}, verify=srv.ca_path,
                                     timeout=HTTP_TIMEOUT_S)
                    assert r.status_code == 200, r.text
                    missing -= {reading["seq"] for reading in r.json()["readings"]}
                twin = srv.client().get_digital_twin("boiler-r")
                assert twin["temperature"] == payloads[-1]["readings"][0]["value"]
            finally:
                gen.close()
        finally:
            publisher.loop_stop()
            publisher.disconnect()
