#!/usr/bin/env python3
"""Reads a topic with Confluent's own Python client and Avro deserializer, as a Confluent user's
consumer would: one JSON line per record, {"offset", "key", "value"}, keys and values decoded
through the schema registry (a null key or value stays null). Any record the deserializer
refuses makes it exit 1 naming the offset and the error.

    dev/stack tools   # installs confluent-kafka[avro,schemaregistry] into .stack/py
    .stack/py/bin/python dev/confluent_read.py --topic T --count N \
        [--bootstrap 127.0.0.1:9092] [--registry URL] [--timeout-s 30]

Defaults come from the variables `dev/stack env` prints (ECST_KAFKA_BOOTSTRAP,
ECST_SCHEMA_REGISTRY_URL). It stops after --count records, or exits 2 if fewer arrive within
--timeout-s seconds.
"""

import argparse
import json
import os
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def plain(v):
    """Avro values as JSON: bytes as hex, decimals and the like as text."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def transport_error(e: BaseException) -> bool:
    """A registry that did not answer (a timeout, a refused or broken connection), as opposed
    to a record the deserializer refuses."""
    while e is not None:
        kind = type(e)
        if kind.__module__.split(".")[0].startswith("httpx") or isinstance(e, (TimeoutError, ConnectionError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--bootstrap", default=os.environ.get("ECST_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument("--registry", default=os.environ.get("ECST_SCHEMA_REGISTRY_URL"))
    ap.add_argument("--timeout-s", type=float, default=30.0)
    args = ap.parse_args()
    if not args.registry:
        print("no --registry and no ECST_SCHEMA_REGISTRY_URL", file=sys.stderr)
        return 2
    # A request the registry never answers must not hang the reader (seen once with Apicurio
    # under load): each request times out, and a timed-out lookup is asked again below.
    registry = SchemaRegistryClient({"url": args.registry, "timeout": 10})
    deserialize = AvroDeserializer(registry)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"confluent-read-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([args.topic])
    seen = 0
    deadline = time.monotonic() + args.timeout_s
    try:
        while seen < args.count:
            if time.monotonic() > deadline:
                print(f"{seen} of {args.count} records after {args.timeout_s} s", file=sys.stderr)
                return 2
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                print(f"consumer error: {msg.error()}", file=sys.stderr)
                return 1
            out = {"offset": msg.offset()}
            for field, raw, name in (
                (MessageField.KEY, msg.key(), "key"),
                (MessageField.VALUE, msg.value(), "value"),
            ):
                ctx = SerializationContext(msg.topic(), field)
                for attempt in range(1, 6):
                    try:
                        out[name] = None if raw is None else plain(deserialize(raw, ctx))
                        break
                    except Exception as e:
                        if transport_error(e) and attempt < 5:
                            print(f"offset {msg.offset()}: registry: {e!r}; asking again", file=sys.stderr)
                            continue
                        # The deserializer's refusal is the finding.
                        print(f"offset {msg.offset()}: the {name} is refused: {e!r}", file=sys.stderr)
                        return 1
            print(json.dumps(out, sort_keys=True), flush=True)
            seen += 1
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
