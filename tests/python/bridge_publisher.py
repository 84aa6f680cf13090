#!/usr/bin/env python3
"""An independent publisher for Thingsgate's AMQP bridge tests (tests/tests/bridge_amqp.rs).

Plays the device hub in front of a bridge: with pika (PyPI `pika` 1.x, BlockingConnection) it
connects to RabbitMQ itself (not to Thingsgate), declares a server-named exclusive reply queue,
and publishes, with publisher confirms and `mandatory`, into --queue (through the default
exchange) one Ditto envelope per --value, each modifying --thing's `temp` value, as a hub
would: header `device_id` (--device-id), `reply_to` (the reply queue), `correlation_id`
(`pika-<i>`), persistent. With --foreign-thing it publishes one more command, addressed to that
thing with the same `device_id` (the bridge's enforcement must refuse it). Then it reads one
answer per command from the reply queue.

Prints one JSON object per line on stdout (the Rust test reads them):
`{"step": "published", "count": N}`, then per answer
`{"step": "answer", "correlation_id": …, "status_header": …, "envelope": {…}}`, then
`{"step": "done"}`. Every wait is bounded by --timeout. Exit code 0 on success, 1 on a failed
step, 2 when pika is missing.
"""

import argparse
import json
import sys

try:
    import pika
    import pika.exceptions
except ImportError:
    print("pika is not installed: pip install 'pika>=1.3,<2' (cargo xtask test does)", file=sys.stderr)
    sys.exit(2)


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def fail(message):
    emit("fail", message=message)
    sys.exit(1)


def modify_temp(thing, value, correlation):
    namespace, name = thing.split(":", 1)
    return {
        "topic": f"{namespace}/{name}/things/twin/commands/modify",
        "path": "/features/temp/properties/value",
        "value": value,
        "headers": {"correlation-id": correlation},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uri", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--thing", required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--values", default="1,2,3", help="comma-separated numbers")
    parser.add_argument("--foreign-thing")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    parameters = pika.URLParameters(args.uri)
    parameters.connection_attempts = 1
    parameters.socket_timeout = args.timeout
    parameters.stack_timeout = args.timeout
    parameters.blocked_connection_timeout = args.timeout
    parameters.client_properties = {"connection_name": "e2e-bridge-publisher"}
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPError as e:
        fail(f"cannot connect to {args.uri.split('@')[-1]}: {e!r}")

    channel = connection.channel()
    channel.confirm_delivery()
    reply_queue = channel.queue_declare("", exclusive=True).method.queue

    commands = []
    for i, value in enumerate(v for v in args.values.split(",") if v):
        commands.append((f"pika-{i}", modify_temp(args.thing, float(value), f"pika-{i}")))
    if args.foreign_thing:
        commands.append(("pika-foreign", modify_temp(args.foreign_thing, -1, "pika-foreign")))

    for correlation, envelope in commands:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            reply_to=reply_queue,
            correlation_id=correlation,
            headers={"device_id": args.device_id},
        )
        try:
            channel.basic_publish(
                exchange="",
                routing_key=args.queue,
                body=json.dumps(envelope).encode(),
                properties=properties,
                mandatory=True,
            )
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as e:
            fail(f"RabbitMQ did not take command {correlation}: {e!r}")
    emit("published", count=len(commands))

    answered = 0
    for method, properties, body in channel.consume(reply_queue, inactivity_timeout=args.timeout):
        if method is None:
            fail(f"{answered} of {len(commands)} answers within {args.timeout} s")
        channel.basic_ack(method.delivery_tag)
        try:
            envelope = json.loads(body)
        except ValueError:
            fail(f"an answer is not JSON: {body!r}")
        headers = properties.headers or {}
        emit(
            "answer",
            correlation_id=properties.correlation_id,
            status_header=headers.get("status"),
            envelope=envelope,
        )
        answered += 1
        if answered == len(commands):
            break
    channel.cancel()
    connection.close()
    emit("done")


if __name__ == "__main__":
    main()
