#!/usr/bin/env python3
"""An independent MQTT client for Thingsgate's end-to-end tests (tests/tests/mqtt_clients.rs,
tests/tests/mqtt_websocket.rs).

With Eclipse Paho (PyPI `paho-mqtt` 2.x), over TCP or WebSockets (--transport websockets, path
--ws-path): connect, subscribe at QoS 1, publish to the subscribed topic at each --qos (default:
1) and receive each message back at that QoS; or, with --expect-refused, check that the CONNECT
is refused. Every wait is bounded by --timeout.

Prints one line per step on stdout; exit code 0 on success, 1 on a failed check, 2 when
paho-mqtt is missing.
"""

import argparse
import sys
import threading

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:
    print("paho-mqtt is not installed: pip install 'paho-mqtt>=2,<3'", file=sys.stderr)
    sys.exit(2)


def fail(message):
    print(f"FAIL {message}", flush=True)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=["311", "5"], required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--topic", default="e2e/paho/temp")
    parser.add_argument("--payload", default="21.5")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    parser.add_argument("--ws-path", default="/mqtt")
    parser.add_argument(
        "--qos",
        type=int,
        choices=[0, 1],
        action="append",
        help="publish at this QoS (repeatable, in order; default: 1)",
    )
    parser.add_argument(
        "--expect-refused",
        type=int,
        metavar="CODE",
        help="expect the CONNECT refused with this reason code (paho reports 3.1.1 return "
        "codes as MQTT 5 reason codes: 4 -> 134, 5 -> 135)",
    )
    args = parser.parse_args()

    protocol = mqtt.MQTTv311 if args.protocol == "311" else mqtt.MQTTv5
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=protocol,
        transport=args.transport,
    )
    if args.transport == "websockets":
        client.ws_set_options(path=args.ws_path)
    if args.username is not None or args.password is not None:
        client.username_pw_set(args.username, args.password)

    connected = threading.Event()
    subscribed = threading.Event()
    published = threading.Event()
    received = threading.Event()
    state = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connack"] = reason_code
        connected.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        state["suback"] = reason_codes
        subscribed.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        state["puback"] = reason_code
        published.set()

    def on_message(client, userdata, message):
        state["message"] = message
        received.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message

    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as error:
        fail(f"cannot connect to {args.host}:{args.port}: {error}")
    client.loop_start()
    try:
        if not connected.wait(args.timeout):
            fail("no CONNACK")
        code = state["connack"]
        print(f"connack {code.value} {code}", flush=True)
        if args.expect_refused is not None:
            if code.value != args.expect_refused:
                fail(f"expected CONNACK {args.expect_refused}, got {code.value} ({code})")
            print("refused as expected", flush=True)
            return
        if code.is_failure:
            fail(f"CONNECT refused: {code.value} ({code})")

        result, _ = client.subscribe(args.topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            fail(f"subscribe not sent: {result}")
        if not subscribed.wait(args.timeout):
            fail("no SUBACK")
        granted = [c.value for c in state["suback"]]
        print(f"suback {granted}", flush=True)
        if granted != [1]:
            fail(f"expected QoS 1 granted, got {granted}")

        for qos in args.qos or [1]:
            published.clear()
            received.clear()
            info = client.publish(args.topic, args.payload.encode(), qos=qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                fail(f"publish not sent: {info.rc}")
            if not published.wait(args.timeout):
                fail("no PUBACK" if qos else "QoS 0 publish not written")
            if qos:
                print(f"puback {state['puback'].value}", flush=True)
                if state["puback"].is_failure:
                    fail(f"publish refused: {state['puback']}")

            if not received.wait(args.timeout):
                fail(f"the message published at QoS {qos} was not delivered back")
            message = state["message"]
            payload = message.payload.decode(errors="replace")
            print(f"received {message.topic} {payload} qos={message.qos}", flush=True)
            if message.topic != args.topic or payload != args.payload or message.qos != qos:
                fail(f"expected {args.topic} {args.payload} qos={qos}")
        client.disconnect()
        print("ok", flush=True)
    finally:
        client.loop_stop()


if __name__ == "__main__":
    main()
