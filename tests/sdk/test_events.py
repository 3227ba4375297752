"""Event routes that deliver, judged by consumers that share no code with twinguard: a NATS
JetStream subscriber (nats-py), an MQTT 5 subscriber (paho) through Mosquitto, and a webhook
receiver that checks signatures with the Standard Webhooks reference library (HMAC `v1`) and
with `cryptography` (Ed25519 `v1a`, and the signature NATS and MQTT carry). The official SDK's
`publish_telemetry` and `publish_component_telemetry` produce telemetry events. Then a crash
(kill -9) and an outage of the consumers during a write load: every acknowledged change
arrives at least once, duplicates carry the same ID, and each twin's events keep their order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nats
import paho.mqtt.client as mqtt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.properties import Properties  # noqa: F401  (paho's MQTT 5 support)
from standardwebhooks.webhooks import Webhook

from conftest import HTTP_TIMEOUT_S, _serve, free_port, serve_shared, single_node_only

MODEL = "dtmi:test:events:Room;1"
SENSOR = "dtmi:test:events:Sensor;1"
MODELS = [
    {"@context": "dtmi:dtdl:context;3", "@id": SENSOR, "@type": "Interface",
     "contents": [{"@type": "Telemetry", "name": "value", "schema": "double"}]},
    {"@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
     "contents": [
         {"@type": "Property", "name": "temperature", "schema": "double"},
         {"@type": "Telemetry", "name": "humidity", "schema": "double"},
         {"@type": "Relationship", "name": "next",
          "properties": [{"@type": "Property", "name": "weight", "schema": "double"}]},
         {"@type": "Component", "name": "probe", "schema": SENSOR},
     ]},
]
SECRET = base64.b64encode(b"s" * 32).decode()
# How long the consumers are away (the issue asks for a minute).
OUTAGE_S = 60


class Hook:
    """A webhook receiver on loopback. Verifies every request as it arrives; `down` makes it
    refuse connections (the socket is closed) until `up`."""

    def __init__(self, event_key: Ed25519PublicKey | None = None):
        self.received: list[dict] = []
        self.failures: list[str] = []
        self.event_key = event_key
        self.port = free_port()
        self._server = None
        self.up()

    def up(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook("whsec_" + SECRET).verify(body, headers)
                    if hook.event_key is not None:
                        hook.verify_v1a(body, headers)
                    hook.received.append(json.loads(body))
                    self.send_response(204)
                except Exception as e:  # recorded, and the test fails on it
                    hook.failures.append(repr(e))
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self):
        self._server.shutdown()
        self._server.server_close()

    def verify_v1a(self, body: bytes, headers: dict):
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        schemes = dict(part.split(",", 1) for part in headers["webhook-signature"].split(" "))
        self.event_key.verify(base64.b64decode(schemes["v1a"]), signed)


def event_key(srv) -> Ed25519PublicKey:
    jwks = requests.get(f"{srv.endpoint}/.well-known/event-keys.json", verify=srv.ca_path, timeout=HTTP_TIMEOUT_S).json()
    key = jwks["keys"][0]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519"
    raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
    return Ed25519PublicKey.from_public_bytes(raw)


def admin(srv, method, path, body=None):
    token = srv.credential().get_token().token
    r = srv.session().request(method, f"{srv.endpoint}{path}", json=body, verify=srv.ca_path,
                         headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code < 300, r.text
    return r


def secret_file(srv, directory=None):
    """A webhook secret in `directory`, by default the server's endpoint credentials directory."""
    path = (directory or srv.data_dir / "endpoint-credentials") / f"hook-secret-{uuid.uuid4().hex}"
    path.write_text("whsec_" + SECRET)
    return str(path)


class NatsStream:
    """A JetStream stream of its own on a NATS server, read with nats-py."""

    def __init__(self, url: str):
        self.url = url
        self.name = "TGPY_" + uuid.uuid4().hex[:12].upper()
        self.subject = f"tgpy.{self.name}"

    def run(self, coro):
        return asyncio.run(coro)

    async def _create(self):
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        await js.add_stream(name=self.name, subjects=[self.subject])
        await nc.close()

    async def _read(self):
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        info = await js.stream_info(self.name)
        out = []
        for seq in range(1, info.state.last_seq + 1):
            msg = await js.get_msg(self.name, seq)
            out.append((msg.headers or {}, msg.data))
        await nc.close()
        return out

    async def _delete(self):
        nc = await nats.connect(self.url)
        await nc.jetstream().delete_stream(self.name)
        await nc.close()

    def create(self):
        self.run(self._create())

    def read(self):
        return self.run(self._read())

    def delete(self):
        with contextlib.suppress(Exception):
            self.run(self._delete())


class MqttTopic:
    """An MQTT 5 subscriber (paho) on Mosquitto."""

    def __init__(self, port=1883):
        self.topic = f"tgpy/events/{uuid.uuid4().hex}"
        self.received: list[tuple[bytes, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tgpy-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(10)

    def _message(self, client, userdata, msg):
        props = dict(getattr(msg.properties, "UserProperty", []) or [])
        self.received.append((msg.payload, props))

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(what, condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    """The endpoint credentials directory: on several nodes, one path that each node reads (the
    node holding an endpoint's lease reads its files when it connects)."""
    return tmp_path_factory.mktemp("endpoint-credentials")


@pytest.fixture(scope="module")
def esrv(tmp_path_factory, credentials):
    yield from serve_shared(tmp_path_factory, ("--egress-allow", "127.0.0.1", "--endpoint-credentials", str(credentials)))


def test_consumers_receive_exactly_the_api_calls_in_adt_shapes(esrv, credentials):
    key = event_key(esrv)
    hook = Hook(key)
    stream = NatsStream("nats://127.0.0.1:4222")
    stream.create()
    topic = MqttTopic()
    try:
        admin(esrv, "PUT", "/admin/endpoints/py-hook",
              {"type": "webhook", "url": f"http://127.0.0.1:{hook.port}/events", "secretFile": secret_file(esrv, credentials)})
        admin(esrv, "PUT", "/admin/endpoints/py-nats",
              {"type": "natsJetStream", "url": "nats://127.0.0.1:4222", "subject": stream.subject})
        admin(esrv, "PUT", "/admin/endpoints/py-mqtt",
              {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": topic.topic})
        client = esrv.client()
        for endpoint in ("py-hook", "py-nats", "py-mqtt"):
            client.upsert_event_route(f"route-{endpoint}", {"endpointName": endpoint, "filter": "true"})
        client.create_models(MODELS)
        client.upsert_digital_twin("ev-a", {"$metadata": {"$model": MODEL}, "temperature": 20.0, "probe": {"$metadata": {}}})
        client.upsert_digital_twin("ev-b", {"$metadata": {"$model": MODEL}, "temperature": 21.0, "probe": {"$metadata": {}}})
        patch = [{"op": "replace", "path": "/temperature", "value": 22.5}]
        client.update_digital_twin("ev-a", patch)
        client.upsert_relationship("ev-a", "r1", {"$targetId": "ev-b", "$relationshipName": "next", "weight": 1.0})
        rel_patch = [{"op": "replace", "path": "/weight", "value": 2.0}]
        client.update_relationship("ev-a", "r1", rel_patch)
        client.publish_telemetry("ev-a", {"humidity": 41.5}, message_id="msg-1")
        client.publish_telemetry("ev-a", {"humidity": 41.5}, message_id="msg-1")  # a repeat: not sent again
        client.publish_component_telemetry("ev-a", "probe", {"value": 3.25}, message_id="msg-2")
        client.delete_relationship("ev-a", "r1")
        client.delete_digital_twin("ev-b")
        expected = [
            ("Microsoft.DigitalTwins.Twin.Create", "ev-a"),
            ("Microsoft.DigitalTwins.Twin.Create", "ev-b"),
            ("Microsoft.DigitalTwins.Twin.Update", "ev-a"),
            ("Microsoft.DigitalTwins.Relationship.Create", "ev-a/relationships/r1"),
            ("Microsoft.DigitalTwins.Relationship.Update", "ev-a/relationships/r1"),
            ("microsoft.iot.telemetry", "ev-a"),
            ("microsoft.iot.telemetry", "ev-a/components/probe"),
            ("Microsoft.DigitalTwins.Relationship.Delete", "ev-a/relationships/r1"),
            ("Microsoft.DigitalTwins.Twin.Delete", "ev-b"),
        ]
        wait_until("the webhook's events", lambda: len(hook.received) >= len(expected))
        wait_until("the MQTT events", lambda: len(topic.received) >= len(expected))
        wait_until("the NATS events", lambda: len(stream.read()) >= len(expected))
        time.sleep(0.5)
        assert hook.failures == []
        nats_events = []
        for headers, data in stream.read():
            key.verify(base64.b64decode(headers["Twinguard-Signature"]), data)
            event = json.loads(data)
            assert headers["Nats-Msg-Id"] == event["id"]
            nats_events.append(event)
        mqtt_events = []
        for payload, props in topic.received:
            key.verify(base64.b64decode(props["twinguard-signature"]), payload)
            mqtt_events.append(json.loads(payload))
        for consumer, events in (("webhook", hook.received), ("nats", nats_events), ("mqtt", mqtt_events)):
            assert [(e["type"], e["subject"]) for e in events] == expected, consumer
            assert [e["id"] for e in events] == [e["id"] for e in hook.received], consumer
        events = hook.received
        # CloudEvents 1.0 with ADT's attributes (concepts-event-notifications).
        for e in events:
            assert e["specversion"] == "1.0"
            assert e["source"] == "127.0.0.1"
            assert e["datacontenttype"] == "application/json"
            uuid.UUID(e["id"])
        # Lifecycle: the twin as GET returns it.
        assert events[0]["data"]["$dtId"] == "ev-a"
        assert events[0]["data"]["$metadata"]["$model"] == MODEL
        assert events[0]["data"]["temperature"] == 20.0
        # Change: {"modelId", "patch"} with the JSON Patch that was applied.
        assert events[2]["data"] == {"modelId": MODEL, "patch": patch}
        assert events[3]["data"]["$relationshipId"] == "r1"
        assert events[3]["data"]["$targetId"] == "ev-b"
        assert events[4]["data"] == {"modelId": MODEL, "patch": rel_patch}
        # Telemetry: the body, with dataschema naming the model (the component's for a component).
        assert events[5]["data"] == {"humidity": 41.5}
        assert events[5]["dataschema"] == MODEL
        assert events[6]["data"] == {"value": 3.25}
        assert events[6]["dataschema"] == SENSOR
        assert events[8]["data"]["$dtId"] == "ev-b"
        # The per-twin sequence orders each twin's events: 1, 2, 3...
        per_twin: dict[str, list[int]] = {}
        for e in events:
            per_twin.setdefault(e["subject"].split("/")[0], []).append(e["twinsequence"])
        for twin, seqs in per_twin.items():
            assert seqs == list(range(1, len(seqs) + 1)), twin
    finally:
        for endpoint in ("py-hook", "py-nats", "py-mqtt"):
            with contextlib.suppress(Exception):
                esrv.client().delete_event_route(f"route-{endpoint}")
            with contextlib.suppress(AssertionError):
                admin(esrv, "DELETE", f"/admin/endpoints/{endpoint}")
        hook.down()
        topic.close()
        stream.delete()


@contextlib.contextmanager
def own_nats(directory):
    """A NATS server with JetStream of this test's own, so it can be stopped and started."""
    port = free_port()
    args = ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(directory)]

    class Handle:
        process = None

        def start(self):
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until("nats-server", lambda: _port_open(port), timeout=10)

        def stop(self):
            self.process.terminate()
            self.process.wait(timeout=10)

    handle = Handle()
    handle.start()
    try:
        yield port, handle
    finally:
        if handle.process.poll() is None:
            handle.stop()


def _port_open(port):
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@single_node_only
@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is needed to stop and start NATS")
def test_kill_9_and_consumer_outages_lose_no_acknowledged_change(tmp_path_factory):
    directory = tmp_path_factory.mktemp("events-crash")
    with own_nats(directory / "js") as (nats_port, nats_server):
        args = ("--egress-allow", "127.0.0.1")
        gen = _serve(tmp_path_factory, args)
        srv = next(gen)
        key = event_key(srv)
        hook = Hook(key)
        stream = NatsStream(f"nats://127.0.0.1:{nats_port}")
        stream.create()
        acknowledged: list[tuple[str, float]] = []
        try:
            admin(srv, "PUT", "/admin/endpoints/crash-hook",
                  {"type": "webhook", "url": f"http://127.0.0.1:{hook.port}/e", "secretFile": secret_file(srv),
                   "initialBackoffMs": 50})
            admin(srv, "PUT", "/admin/endpoints/crash-nats",
                  {"type": "natsJetStream", "url": f"nats://127.0.0.1:{nats_port}", "subject": stream.subject,
                   "initialBackoffMs": 50})
            client = srv.client()
            client.create_models(MODELS)
            client.upsert_event_route("to-hook", {"endpointName": "crash-hook", "filter": "true"})
            client.upsert_event_route("to-nats", {"endpointName": "crash-nats", "filter": "true"})

            def load(client, start, count):
                for i in range(start, start + count):
                    twin = f"load-{i % 5}"
                    try:
                        client.upsert_digital_twin(twin, {"$metadata": {"$model": MODEL}, "temperature": float(i), "probe": {"$metadata": {}}})
                    except Exception:
                        return  # the server died under the load: what was acknowledged counts
                    acknowledged.append((twin, float(i)))

            load(client, 0, 40)
            # Both consumers go away for a minute while writes continue, then come back.
            hook.down()
            nats_server.stop()
            outage_end = time.monotonic() + OUTAGE_S
            i = 40
            while time.monotonic() < outage_end:
                load(client, i, 1)
                i += 1
                time.sleep(0.25)
            nats_server.start()
            hook.up()
            backlog = len(acknowledged)
            wait_until("the backlog delivered after the outage", lambda: len(hook.received) >= backlog, timeout=90)
            # kill -9 during a write load, while its events are being delivered.
            writer = threading.Thread(target=load, args=(client, 1000, 2000))
            writer.start()
            time.sleep(1.5)
            srv_process_kill(srv)
            writer.join()
            gen.close()
            # Restart twinguard on the same data directory.
            gen = _serve(tmp_path_factory, args, data_dir=srv.data_dir)
            srv = next(gen)
            load(srv.client(), 5000, 20)
            temperatures = {t for _, t in acknowledged}
            assert sum(1 for _, t in acknowledged if 1000 <= t < 3000) < 2000, "the kill came during the load"

            def temperature(e):
                if e["type"] == "Microsoft.DigitalTwins.Twin.Create":
                    return e["data"]["temperature"]
                return next(op["value"] for op in e["data"]["patch"] if op["path"] == "/temperature")

            def seen(events):
                return {temperature(e) for e in events if e["type"].startswith("Microsoft.DigitalTwins.Twin")}

            def nats_events():
                out = []
                for headers, data in stream.read():
                    key.verify(base64.b64decode(headers["Twinguard-Signature"]), data)
                    out.append(json.loads(data))
                return out

            wait_until("every acknowledged change at the webhook", lambda: temperatures <= seen(hook.received), timeout=150)
            wait_until("every acknowledged change in JetStream", lambda: temperatures <= seen(nats_events()), timeout=150)
            assert hook.failures == []
            print(f"acknowledged {len(acknowledged)}, webhook received {len(hook.received)} "
                  f"({len(hook.received) - len({e['id'] for e in hook.received})} duplicates), "
                  f"JetStream holds {len(nats_events())}")
            for consumer, events in (("webhook", hook.received), ("nats", nats_events())):
                first: dict[str, dict] = {}
                order: dict[str, list[int]] = {}
                for e in events:
                    if e["id"] in first:
                        # A duplicate is the same event, byte for byte in content.
                        assert first[e["id"]] == e, consumer
                        continue
                    first[e["id"]] = e
                    order.setdefault(e["subject"], []).append(e["twinsequence"])
                for twin, seqs in order.items():
                    assert seqs == sorted(seqs), f"{consumer}: {twin} out of order"
                    assert seqs == list(range(1, len(seqs) + 1)), f"{consumer}: {twin} has a gap"
        finally:
            gen.close()
            with contextlib.suppress(Exception):
                hook.down()
            stream.delete()


def srv_process_kill(srv):
    """kill -9 the server: no shutdown, no flush beyond what was committed."""
    srv.process.kill()
    srv.process.wait(timeout=10)
