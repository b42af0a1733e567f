"""The baseline `lanes bench-cpu --python` compares Lanes against: the same job as a
straightforward Python pipeline in one process, written with the libraries a Python
team would reach for.

It reads raw JSON events, validates them (required fields, exactly the model's
features, finite numbers), scores batches of up to 512 with onnxruntime, produces
Confluent-Avro `Prediction`s (AvroSerializer, TopicNameStrategy) and writes each
entity's prediction and features to Redis in one pipeline, then waits for the
broker's acknowledgements and commits: nothing is committed before both.

    python_pipeline.py --bootstrap B --registry URL --redis URL --raw TOPIC
        --predictions TOPIC --group G --model-dir DIR --key-prefix P --events N

It prints `ready` once its partitions are assigned, then one JSON line when N events
are done: drain seconds (first record to last commit) and process CPU seconds (every
thread) over the same span.
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib

import numpy as np
import onnxruntime as ort
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

BATCH = 512


def validate(raw, features):
    event = json.loads(raw)
    for field in ("entity_id", "features"):
        if field not in event:
            raise ValueError(f"missing {field}")
    given = event["features"]
    if set(given) != set(features):
        raise ValueError("features do not match the model")
    row = [float(given[f]) for f in features]
    if not all(math.isfinite(v) for v in row):
        raise ValueError("feature not finite")
    event_time = event.get("event_time")
    if not isinstance(event_time, int):
        raise ValueError("event_time must be epoch milliseconds here")
    return event, row


def main():
    p = argparse.ArgumentParser()
    for a in ("bootstrap", "registry", "redis", "raw", "predictions", "group",
              "model-dir", "key-prefix"):
        p.add_argument(f"--{a}", required=True)
    p.add_argument("--events", type=int, required=True)
    args = p.parse_args()

    with open(f"{args.model_dir}/model.toml", "rb") as f:
        spec = tomllib.load(f)
    features = spec["features"]
    session = ort.InferenceSession(f"{args.model_dir}/model.onnx",
                                   providers=["CPUExecutionProvider"])
    schema = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "schemas",
                          "Prediction.avsc")
    with open(schema) as f:
        serializer = AvroSerializer(SchemaRegistryClient({"url": args.registry}), f.read())
    ctx = SerializationContext(args.predictions, MessageField.VALUE)
    cache = redis.Redis.from_url(args.redis)
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5,
                         "enable.idempotence": True})
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 6000})

    def assigned(_consumer, partitions):
        if partitions:
            print("ready", flush=True)

    consumer.subscribe([args.raw], on_assign=assigned)
    failed = []
    done = 0
    started = cpu_started = None
    while done < args.events:
        messages = consumer.consume(num_messages=BATCH, timeout=0.1)
        if not messages:
            continue
        if started is None:
            started, cpu_started = time.monotonic(), time.process_time()
        good, rows = [], []
        for m in messages:
            if m.error():
                sys.exit(f"consume failed: {m.error()}")
            try:
                event, row = validate(m.value(), features)
            except (ValueError, TypeError) as e:
                print(f"invalid event: {e}", file=sys.stderr)
                continue
            good.append(event)
            rows.append(row)
        if rows:
            scored = session.run([spec["output"]],
                                 {spec["input"]: np.asarray(rows, dtype=np.float32)})[0]
            now = int(time.time() * 1000)
            pipe = cache.pipeline(transaction=False)
            for event, probabilities in zip(good, scored):
                score = float(probabilities[spec["positive_class"]])
                label = (spec["positive_label"] if score >= spec["threshold"]
                         else spec["negative_label"])
                prediction = {
                    "event_id": event.get("event_id", ""), "entity_id": event["entity_id"],
                    "score": score, "label": label, "model_name": spec["name"],
                    "model_version": spec["version"], "lane": "STREAM",
                    "event_time": event["event_time"], "ingested_at": now,
                    "scored_at": now, "batch_id": None,
                }
                producer.produce(args.predictions, key=event["entity_id"].encode(),
                                 value=serializer(prediction, ctx),
                                 on_delivery=lambda err, _m: err and failed.append(err))
                producer.poll(0)
                pipe.hset(f"{args.key_prefix}{event['entity_id']}", mapping={
                    "score": score, "label": label, "model_name": spec["name"],
                    "model_version": spec["version"], "event_id": prediction["event_id"],
                    "event_time": event["event_time"], "scored_at": now, "lane": "STREAM",
                    "ingested_at": now, "features": json.dumps(event["features"]),
                    "features_event_time": event["event_time"],
                })
            pipe.execute()
        if producer.flush(30) != 0 or failed:
            sys.exit(f"predictions not acknowledged: {failed or 'flush timed out'}")
        consumer.commit(asynchronous=False)
        done += len(messages)
    print(json.dumps({"events": done, "drain_s": time.monotonic() - started,
                      "cpu_s": time.process_time() - cpu_started}), flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
