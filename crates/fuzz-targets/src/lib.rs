//! Fuzz target bodies. Each takes arbitrary bytes and must return without panicking,
//! whatever they hold; `fuzz/` runs them under libFuzzer (`cargo fuzz run <target>`),
//! and `tests/corpus.rs` replays every committed input through them in the test suite.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{AvroResult, Schema, from_value, to_value};
use lanes_common::avro::{check_framing, limit_allocations};
use lanes_common::records::{
    Event, MicroBatch, Prediction, PredictionRequest, PredictionResponse, Record,
};
use lanes_ingest::validate::{Origin, Rules, validate, validate_by_tree};
use lanes_schema_registry::compat::{self, Level};
use lanes_schema_registry::store::canonical;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [(&str, Target); 4] = [
    ("confluent_framing", confluent_framing),
    ("avro_records", avro_records),
    ("raw_event", raw_event),
    ("registry_schema", registry_schema),
];

/// The 5-byte Confluent header: an id out of every well-framed input, a reason for
/// every other.
pub fn confluent_framing(data: &[u8]) {
    match check_framing(data) {
        Ok(id) => {
            assert!(data.len() >= 5 && data[0] == 0);
            assert_eq!(id.to_be_bytes(), data[1..5]);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Every Lanes record read from arbitrary Avro bytes, as a decoder does after the
/// header: what decodes must encode and decode back to itself.
pub fn avro_records(data: &[u8]) {
    limit_allocations();
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => round_trip::<Event>(body),
        1 => round_trip::<MicroBatch>(body),
        2 => round_trip::<Prediction>(body),
        3 => round_trip::<PredictionRequest>(body),
        _ => round_trip::<PredictionResponse>(body),
    }
}

fn read(schema: &Schema, bytes: &[u8]) -> AvroResult<Value> {
    GenericDatumReader::builder(schema)
        .build()?
        .read_value(&mut &bytes[..])
}

fn write<R: Record>(schema: &Schema, record: &R) -> AvroResult<Vec<u8>> {
    let value = to_value(record)?.resolve(schema)?;
    GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)
}

fn round_trip<R: Record + std::fmt::Debug>(body: &[u8]) {
    let schema: &Schema = R::schema();
    let Ok(value) = read(schema, body) else {
        return;
    };
    let Ok(record) = from_value::<R>(&value) else {
        return;
    };
    let again = write(schema, &record).expect("a decoded record encodes");
    let back: R = from_value(&read(schema, &again).expect("re-decodes")).expect("fits its type");
    let twice = write(schema, &back).expect("encodes again");
    let (a, b) = (
        read(schema, &again).expect("decodes"),
        read(schema, &twice).expect("decodes"),
    );
    assert!(
        same(&a, &b),
        "{} does not round-trip: {a:?} / {b:?}",
        R::NAME
    );
}

/// Value equality with floats compared bit for bit (NaN is itself) and maps unordered.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits(),
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Union(i, x), Value::Union(j, y)) => i == j && same(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Record(x), Value::Record(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| k == l && same(v, w))
        }
        _ => a == b,
    }
}

/// Ingest's validation of a raw event: an `Event` that obeys the rules, or a class; the
/// same by either read.
pub fn raw_event(data: &[u8]) {
    let rules = Rules::with_limits(
        ["amount", "hour", "merchant_risk"]
            .map(String::from)
            .to_vec(),
        4096,
        "transaction".into(),
        60_000,
    );
    let origin = Origin {
        topic: "lanes.events.raw",
        partition: 0,
        offset: 7,
        timestamp: Some(1_800_000_000_000),
    };
    let now = 1_800_000_000_000;
    let checked = validate(data, &rules, &origin, now);
    // The one-pass read and the whole tree agree on every input, accepted or not.
    assert_eq!(checked, validate_by_tree(data, &rules, &origin, now));
    if let Ok(event) = checked {
        assert!(data.len() <= rules.max_bytes());
        assert!(
            event.event_time <= now + 60_000,
            "a future time got through"
        );
        assert_eq!(
            lanes_common::records::check_ids(&event.entity_id, &event.event_id),
            Ok(())
        );
        assert_eq!(event.features.len(), rules.features().len());
        assert!(event.features.values().all(|v| v.is_finite()));
    }
}

/// The registry's schema parsing and compatibility check: two schemas split from the
/// input at the first NUL, each parsed and canonicalised, then checked at every level.
pub fn registry_schema(data: &[u8]) {
    limit_allocations();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_once('\0').unwrap_or((text, text));
    let Ok((canon_a, old)) = canonical(a) else {
        return;
    };
    // The canonical form is stable: it parses back to itself.
    let (again, _) = canonical(&canon_a).expect("a canonical schema parses");
    assert_eq!(again, canon_a);
    let Ok((_, new)) = canonical(b) else {
        return;
    };
    for level in [
        Level::None,
        Level::Backward,
        Level::BackwardTransitive,
        Level::Forward,
        Level::ForwardTransitive,
        Level::Full,
        Level::FullTransitive,
    ] {
        let _ = compat::check(level, &new, &[(1, &old)]);
    }
    // A schema is always compatible with itself.
    assert!(compat::check(Level::FullTransitive, &old, &[(1, &old)]).is_empty());
}
