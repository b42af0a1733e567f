"""Confluent's own Python client on the Lanes wire format (used by tests/tests/interop.rs).

produce BOOTSTRAP REGISTRY TOPIC SCHEMA_FILE RECORD_JSON
    AvroSerializer registers SCHEMA_FILE under TOPIC-value and encodes RECORD_JSON;
    prints {"schema_id": N} once the broker acknowledged it.
produce-each BOOTSTRAP REGISTRY TOPIC PAIRS_JSON
    the same for each [schema_file, record] of the JSON array PAIRS_JSON, in order
    (records may hold NaN); prints {"schema_ids": [...]}.
consume BOOTSTRAP REGISTRY TOPIC
    reads one record from the start of TOPIC with AvroDeserializer and prints it as
    JSON (timestamps as epoch milliseconds).
"""

import datetime
import json
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def to_json(value):
    if isinstance(value, datetime.datetime):
        return round(value.timestamp() * 1000)
    raise TypeError(f"cannot encode {type(value)}")


def produce_all(bootstrap, registry, topic, pairs):
    registry_client = SchemaRegistryClient({"url": registry})
    producer = Producer({"bootstrap.servers": bootstrap})
    errors, ids = [], []
    for schema_file, record in pairs:
        with open(schema_file) as f:
            serializer = AvroSerializer(registry_client, f.read())
        value = serializer(record, SerializationContext(topic, MessageField.VALUE))
        producer.produce(topic, key=record["entity_id"].encode(), value=value,
                         on_delivery=lambda err, _msg: err and errors.append(err))
        ids.append(int.from_bytes(value[1:5], "big"))
    if producer.flush(30) != 0 or errors:
        sys.exit(f"produce failed: {errors or 'not flushed'}")
    return ids


def produce(bootstrap, registry, topic, schema_file, record_json):
    ids = produce_all(bootstrap, registry, topic, [(schema_file, json.loads(record_json))])
    print(json.dumps({"schema_id": ids[0]}))


def produce_each(bootstrap, registry, topic, pairs_json):
    ids = produce_all(bootstrap, registry, topic, json.loads(pairs_json))
    print(json.dumps({"schema_ids": ids}))


def consume(bootstrap, registry, topic):
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"interop-{time.time_ns()}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
    })
    consumer.subscribe([topic])
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                sys.exit(f"consume failed: {msg.error()}")
            record = deserializer(msg.value(), SerializationContext(topic, MessageField.VALUE))
            print(json.dumps(record, default=to_json))
            return
        sys.exit("no record within 60s")
    finally:
        consumer.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"produce": produce, "produce-each": produce_each, "consume": consume}[mode](*args)
