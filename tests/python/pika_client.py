#!/usr/bin/env python3
"""An independent AMQP 0.9.1 client for Thingsgate's end-to-end tests (tests/tests/amqp_clients.rs).

With pika (PyPI `pika` 1.x, the client RabbitMQ's tutorials use), BlockingConnection, PLAIN
credentials (solution ID and secret), client property `client_id`:

1. declare a server-named exclusive queue and bind it to `amq.topic` with --bind;
2. with publisher confirms (`channel.confirm_delivery()`), publish --payload to --key with
   properties (persistent, content type, a header) and consume it back;
3. publish to --denied-key, which the solution policy does not let us write: the broker nacks it
   and pika raises NackError (UnroutableError if it were returned);
4. create the thing --thing through its compact twin topic (confirmed), then retrieve it with
   `reply_to` naming a second queue and read the answer from that queue.

Or, with --expect-refused, check that the connection is refused.

Prints one JSON object per line on stdout (the Rust test reads them); every wait is bounded by
--timeout. Exit code 0 on success, 1 on a failed check, 2 when pika is missing.
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


def consume_one(channel, queue, timeout):
    """The next message of `queue` within `timeout` seconds, acknowledged."""
    for method, properties, body in channel.consume(queue, inactivity_timeout=timeout):
        channel.cancel()
        if method is None:
            fail(f"nothing arrived in queue {queue} within {timeout} s")
        channel.basic_ack(method.delivery_tag)
        return method, properties, body
    fail(f"the consumer of {queue} ended without a message")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--client-id", default="pika")
    parser.add_argument("--bind", default="e2e.pika.#")
    parser.add_argument("--key", default="e2e.pika.temp")
    parser.add_argument("--payload", default="21.5")
    parser.add_argument("--denied-key", default="secret.pika")
    parser.add_argument("--thing", default="org.acme:pika-lamp")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--expect-refused", action="store_true")
    args = parser.parse_args()

    parameters = pika.ConnectionParameters(
        host=args.host,
        port=args.port,
        virtual_host="/",
        credentials=pika.PlainCredentials(args.username, args.password),
        client_properties={"client_id": args.client_id},
        connection_attempts=1,
        socket_timeout=args.timeout,
        stack_timeout=args.timeout,
        blocked_connection_timeout=args.timeout,
    )
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPConnectionError as error:
        if args.expect_refused:
            emit("refused", error=type(error).__name__, detail=repr(error))
            return
        fail(f"connection refused: {error!r}")
    if args.expect_refused:
        fail("the connection was accepted")
    server = connection._impl.server_properties  # what connection.start said
    emit(
        "connected",
        product=server.get("product", b"").decode(errors="replace")
        if isinstance(server.get("product"), bytes)
        else server.get("product"),
        publisher_confirms=server.get("capabilities", {}).get("publisher_confirms"),
    )

    channel = connection.channel()
    channel.confirm_delivery()
    declared = channel.queue_declare(queue="", exclusive=True)
    queue = declared.method.queue
    channel.queue_bind(queue=queue, exchange="amq.topic", routing_key=args.bind)
    emit("bound", queue=queue, key=args.bind)

    # 2. A confirmed publish, consumed back.
    properties = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent,
        content_type="text/plain",
        headers={"unit": "C"},
    )
    try:
        channel.basic_publish("amq.topic", args.key, args.payload.encode(), properties)
    except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
        fail(f"the publish to {args.key} was not confirmed: {error!r}")
    emit("confirmed", key=args.key)
    method, received, body = consume_one(channel, queue, args.timeout)
    emit(
        "received",
        exchange=method.exchange,
        routing_key=method.routing_key,
        body=body.decode(errors="replace"),
        content_type=received.content_type,
        delivery_mode=received.delivery_mode,
        headers={k: v.decode() if isinstance(v, bytes) else v for k, v in (received.headers or {}).items()},
    )

    # 3. A publish the policy denies: a nack, and the channel stays usable.
    try:
        channel.basic_publish("amq.topic", args.denied_key, b"not allowed")
        emit("denied", outcome="confirmed")
    except pika.exceptions.NackError as error:
        emit("denied", outcome="nack", messages=len(error.messages))
    except pika.exceptions.UnroutableError as error:
        emit("denied", outcome="unroutable", messages=len(error.messages))

    # 4. A twin command, and its answer through reply-to.
    namespace, name = args.thing.split(":", 1)
    twin_key = f"{namespace.replace('.', '/')}.{name.replace('.', '/')}.things.twin.commands"
    try:
        channel.basic_publish(
            "amq.topic",
            f"{twin_key}.create",
            json.dumps({"attributes": {"maker": "pika"}}).encode(),
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )
    except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
        fail(f"the create of {args.thing} was not confirmed: {error!r}")
    emit("created", thing=args.thing)
    answers = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.basic_publish(
        "amq.topic",
        f"{twin_key}.retrieve",
        b"",
        pika.BasicProperties(reply_to=answers, correlation_id="pika-1"),
    )
    method, received, body = consume_one(channel, answers, args.timeout)
    try:
        answer = json.loads(body)
    except ValueError:
        fail(f"the answer is no JSON: {body!r}")
    emit(
        "answer",
        exchange=method.exchange,
        routing_key=method.routing_key,
        correlation_id=received.correlation_id,
        answer=answer,
    )

    connection.close()
    emit("ok")


if __name__ == "__main__":
    main()
