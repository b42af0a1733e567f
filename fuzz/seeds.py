"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

Run with the project's venv (fastavro): .venv/bin/python fuzz/seeds.py
Seeds are valid inputs and near misses; libFuzzer grows the corpus from them.
"""
import io
import json
import os
import struct

import fastavro

ROOT = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(ROOT, "..", "schemas")
ORDER = ["Event", "MicroBatch", "Prediction", "PredictionRequest", "PredictionResponse"]


def write(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def schema_text(name):
    with open(os.path.join(SCHEMAS, name + ".avsc")) as f:
        return f.read()


FEATURES = {"amount": 12.5, "hour": 3.0, "merchant_risk": 0.2}
RECORDS = {
    "Event": {"event_id": "e-1", "entity_id": "card-1", "kind": "transaction",
              "event_time": 1800000000000, "ingested_at": 1800000000001, "features": FEATURES},
    "MicroBatch": {"batch_id": "events-0-1-2", "source_partition": 0, "first_offset": 1,
                   "last_offset": 2, "opened_at": 1, "closed_at": 2, "close_reason": "COUNT",
                   "feature_names": ["amount", "hour"], "features": [1.0, 2.0, 3.0, 4.0],
                   "event_ids": ["a", "b"], "entity_ids": ["c", "d"], "kinds": ["t", "t"],
                   "event_times": [1, 2], "ingested_ats": [3, 4]},
    "Prediction": {"event_id": "e-1", "entity_id": "card-1", "score": 0.25, "label": None,
                   "model_name": "fraud", "model_version": "1", "lane": "STREAM",
                   "event_time": 1, "ingested_at": 2, "scored_at": 3, "batch_id": None},
    "PredictionRequest": {"request_id": "r-1", "entity_id": "card-1", "features": FEATURES,
                          "max_age_ms": 1000, "reply_topic": None, "requested_at": 5},
    "PredictionResponse": {"request_id": "r-1", "entity_id": "card-1", "status": "OK",
                           "score": 0.5, "model_version": "1", "source": "CACHE",
                           "cache_age_ms": 10, "error": None, "responded_at": 6},
}


def fill(schema, record):
    """Adds defaults for fields a schema has and the sample lacks."""
    out = dict(record)
    for f in schema["fields"]:
        if f["name"] not in out:
            out[f["name"]] = f.get("default")
    return out


def avro_seeds():
    for i, name in enumerate(ORDER):
        parsed = fastavro.parse_schema(json.loads(schema_text(name)))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, fill(json.loads(schema_text(name)), RECORDS[name]))
        body = buf.getvalue()
        write("avro_records", f"{name}-valid", bytes([i]) + body)
        write("avro_records", f"{name}-truncated", bytes([i]) + body[: len(body) // 2])
        # A string length of 2^62: the allocation limit must refuse it.
        write("avro_records", f"{name}-huge-length", bytes([i]) + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f")
        write("confluent_framing", f"{name}-framed", b"\x00" + struct.pack(">I", 7 + i) + body)


def framing_seeds():
    for name, data in {
        "empty": b"",
        "magic-only": b"\x00",
        "short": b"\x00\x00\x01",
        "header-only": b"\x00\x00\x00\x00\x01",
        "bad-magic": b"\x01\x00\x00\x00\x01abc",
        "json": b'{"event_id":"x"}',
        "max-id": b"\x00\xff\xff\xff\xffz",
    }.items():
        write("confluent_framing", name, data)


def raw_seeds():
    ok = {"event_id": "e-1", "entity_id": "card-1", "kind": "transaction",
          "event_time": 1800000000000, "features": FEATURES}
    cases = {
        "valid": ok,
        "no-time": {k: v for k, v in ok.items() if k != "event_time"},
        "iso-time": dict(ok, event_time="2027-01-15T08:00:00Z"),
        "seconds": dict(ok, event_time=1800000000),
        "micros": dict(ok, event_time=1800000000000000),
        "future": dict(ok, event_time=1900000000000),
        "no-entity": {k: v for k, v in ok.items() if k != "entity_id"},
        "unknown-feature": dict(ok, features=dict(FEATURES, zip=1)),
        "string-feature": dict(ok, features=dict(FEATURES, amount="12")),
        "huge-number": dict(ok, features=dict(FEATURES, amount=1e39)),
        "nested": dict(ok, features={"amount": {"a": 1}}),
    }
    for name, value in cases.items():
        write("raw_event", name, json.dumps(value).encode())
    write("raw_event", "nan", json.dumps(dict(ok, features=dict(FEATURES, hour=float("nan")))).encode())
    write("raw_event", "not-json", b"{not json")
    write("raw_event", "array", b"[1,2,3]")
    write("raw_event", "deep", b"[" * 5000 + b"]" * 5000)


def registry_seeds():
    texts = [schema_text(n) for n in ORDER]
    for i, a in enumerate(texts):
        write("registry_schema", f"{ORDER[i]}-self", a.encode())
        b = texts[(i + 1) % len(texts)]
        write("registry_schema", f"{ORDER[i]}-vs-next", (a + "\0" + b).encode())
    event = json.loads(texts[0])
    evolved = dict(event, fields=event["fields"] + [{"name": "channel", "type": ["null", "string"], "default": None}])
    write("registry_schema", "event-evolved", (texts[0] + "\0" + json.dumps(evolved)).encode())
    for name, text in {
        "primitive": '"string"',
        "union": '["null", "int"]',
        "enum": '{"type":"enum","name":"E","symbols":["A","B"]}',
        "recursive": '{"type":"record","name":"L","fields":[{"name":"next","type":["null","L"]}]}',
        "bad-default": '{"type":"record","name":"R","fields":[{"name":"a","type":"int","default":"x"}]}',
        "not-json": "{",
    }.items():
        write("registry_schema", name, text.encode())


if __name__ == "__main__":
    avro_seeds()
    framing_seeds()
    raw_seeds()
    registry_seeds()
