//! Raw JSON event -> `Event`, or the dead-letter class saying why not. Pure.
//!
//! A well-formed event is read in one pass that keeps only the fields ingest uses
//! (no JSON tree, no map of every key). Anything that pass refuses — malformed JSON,
//! `NaN`, a top level that is not an object, escaped keys — is read again as a whole
//! tree ([`validate_by_tree`]), which gives the rejection its class and message; both
//! reads end in the same checks, so they agree on every input (fuzzed).

use std::fmt;

use lanes_common::config::IngestConfig;
use lanes_common::dlq::ErrorClass;
use lanes_common::features::{Cursor, FeatureIndex, Features};
use lanes_common::records::{Event, check_client_time, check_ids, model_value};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Where a raw record came from, for the derived event id and the fallback time.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka timestamp, used when the event names no time.
    pub timestamp: Option<i64>,
}

/// What the validator checks against.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The model's features, indexed by name.
    features: FeatureIndex,
    max_bytes: usize,
    default_kind: String,
    /// How far ahead of ingest's clock an event time may be.
    max_clock_skew_ms: u64,
}

impl Rules {
    /// The rules ingest applies: the served model's `features` and `ingest`'s limits.
    pub fn new(features: Vec<String>, ingest: &IngestConfig) -> Self {
        Self::with_limits(
            features,
            ingest.max_event_bytes,
            ingest.default_kind.clone(),
            ingest.max_clock_skew_ms,
        )
    }

    /// The rules for a model's `features` with the given limits (tests, tools).
    pub fn with_limits(
        features: Vec<String>,
        max_bytes: usize,
        default_kind: String,
        max_clock_skew_ms: u64,
    ) -> Self {
        Self {
            features: FeatureIndex::new(features),
            max_bytes,
            default_kind,
            max_clock_skew_ms,
        }
    }

    /// The model's features in column order.
    pub fn features(&self) -> &[String] {
        self.features.columns()
    }

    /// The largest raw event accepted, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

pub type Rejection = (ErrorClass, String);

/// Stand-in for the non-finite literals (`NaN`, `Infinity`) some JSON writers emit.
const NON_FINITE: &str = "lanes:non-finite:7f3a";

fn reject<T>(class: ErrorClass, message: impl Into<String>) -> Result<T, Rejection> {
    Err((class, message.into()))
}

/// Parses JSON, accepting `NaN`/`Infinity` as values so they are reported as
/// NON_FINITE rather than INVALID_JSON (Python's `json.dumps` writes them by default).
/// `true` with the tree when it holds [`NON_FINITE`] for such a literal: only then is
/// that text a number and not a client's string.
fn parse(raw: &[u8]) -> Result<(Value, bool), Rejection> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) => Ok((v, false)),
        Err(e) => {
            let text = std::str::from_utf8(raw)
                .map_err(|_| (ErrorClass::InvalidJson, "not UTF-8".to_string()))?;
            let replaced = replace_non_finite(text);
            if replaced != text
                && let Ok(v) = serde_json::from_str(&replaced)
                && !non_finite_key(&v)
            {
                return Ok((v, true));
            }
            reject(ErrorClass::InvalidJson, format!("invalid JSON: {e}"))
        }
    }
}

/// Whether a replaced literal stood where a key goes (`{NaN: 1}`), which no JSON
/// writer emits.
fn non_finite_key(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.iter().any(|(k, v)| k == NON_FINITE || non_finite_key(v)),
        Value::Array(a) => a.iter().any(non_finite_key),
        _ => false,
    }
}

/// Whether `v` is a replaced `NaN`/`Infinity` literal of a tree read with `marked`.
fn is_non_finite(v: &Value, marked: bool) -> bool {
    marked && v.as_str() == Some(NON_FINITE)
}

/// Replaces bare `NaN`, `Infinity` and `-Infinity` tokens outside strings.
fn replace_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str(&format!("\"{NON_FINITE}\""));
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What ingest reads of a raw event; a field that is absent or `null` is `None`.
#[derive(Debug, Default, PartialEq)]
struct Fields {
    entity_id: Option<Value>,
    event_id: Option<Value>,
    kind: Option<Value>,
    event_time: Option<Value>,
    /// `None` unless `features` is an object.
    features: Option<Given>,
    /// Read from a tree where `NaN`/`Infinity` literals became [`NON_FINITE`].
    marked: bool,
}

/// An event's `features` object read against the model's feature list.
#[derive(Debug, PartialEq)]
struct Given {
    /// Each model feature's value, in the model's order (`None`: absent or `null`).
    values: Vec<Option<Value>>,
    /// The first name the model does not take, in sorted order.
    unknown: Option<String>,
}

/// The whole JSON tree: the reference read, and the one a rejection is described by.
fn read_tree(raw: &[u8], rules: &Rules) -> Result<Fields, Rejection> {
    let (tree, marked) = parse(raw)?;
    let Value::Object(mut obj) = tree else {
        return reject(ErrorClass::InvalidJson, "the event must be a JSON object");
    };
    let features = match obj.remove("features") {
        Some(Value::Object(given)) => Some(Given {
            values: rules
                .features()
                .iter()
                .map(|name| given.get(name).filter(|v| !v.is_null()).cloned())
                .collect(),
            unknown: given
                .keys()
                .find(|k| !rules.features().contains(k))
                .cloned(),
        }),
        _ => None,
    };
    let mut take = |name| obj.remove(name).filter(|v: &Value| !v.is_null());
    Ok(Fields {
        entity_id: take("entity_id"),
        event_id: take("event_id"),
        kind: take("kind"),
        event_time: take("event_time"),
        features,
        marked,
    })
}

/// One pass over the bytes, keeping only [`Fields`]. Fails on anything unusual, which
/// then takes [`read_tree`].
fn read_streaming(raw: &[u8], rules: &Rules) -> serde_json::Result<Fields> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let fields = EventSeed(rules).deserialize(&mut de)?;
    de.end()?;
    Ok(fields)
}

struct EventSeed<'r>(&'r Rules);

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        // Borrowed keys only: an escaped key fails here and takes the tree.
        while let Some(key) = map.next_key::<&'de str>()? {
            let slot = match key {
                "entity_id" => &mut fields.entity_id,
                "event_id" => &mut fields.event_id,
                "kind" => &mut fields.kind,
                "event_time" => &mut fields.event_time,
                "features" => {
                    fields.features = Some(map.next_value_seed(FeaturesSeed(self.0))?);
                    continue;
                }
                _ => {
                    // Parsed, not skipped: serde_json skips a value without checking its
                    // UTF-8 or escapes, and the tree refuses what that would let by.
                    map.next_value::<Value>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<Value>()?).filter(|v| !v.is_null());
        }
        Ok(fields)
    }
}

/// Reads a `features` object straight into the model's order; anything else fails.
struct FeaturesSeed<'r>(&'r Rules);

impl<'de> DeserializeSeed<'de> for FeaturesSeed<'_> {
    type Value = Given;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Given, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FeaturesSeed<'_> {
    type Value = Given;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of features")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Given, A::Error> {
        let rules = self.0;
        let mut given = Given {
            values: vec![None; rules.features().len()],
            unknown: None,
        };
        let mut cursor = Cursor::default();
        while let Some(key) = map.next_key::<&'de str>()? {
            let value = Some(map.next_value::<Value>()?).filter(|v| !v.is_null());
            // A later value overwrites: a repeated key keeps its last, as in a map.
            match rules.features.find(key, &mut cursor) {
                Some(columns) => {
                    if let Some((last, rest)) = columns.split_last() {
                        for &c in rest {
                            given.values[c].clone_from(&value);
                        }
                        given.values[*last] = value;
                    }
                }
                None if given.unknown.as_deref().is_none_or(|u| key < u) => {
                    given.unknown = Some(key.to_string());
                }
                None => {}
            }
        }
        Ok(given)
    }
}

/// Event time in epoch milliseconds: RFC 3339 text or an integer.
fn event_time(
    v: Option<&Value>,
    marked: bool,
    origin: &Origin<'_>,
    now: i64,
) -> Result<i64, Rejection> {
    match v {
        None => Ok(origin.timestamp.unwrap_or(now)),
        Some(v) if is_non_finite(v, marked) => reject(
            ErrorClass::InvalidEventTime,
            "event_time must be text or a number, got a non-finite number",
        ),
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .or_else(|e| {
                reject(
                    ErrorClass::InvalidEventTime,
                    format!("event_time {s:?} is not RFC 3339: {e}"),
                )
            }),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(ms) if ms >= 0 => Ok(ms),
            _ => reject(
                ErrorClass::InvalidEventTime,
                format!("event_time {n} is not epoch milliseconds"),
            ),
        },
        Some(other) => reject(
            ErrorClass::InvalidEventTime,
            format!("event_time must be text or a number, got {other}"),
        ),
    }
}

fn features(given: Option<Given>, marked: bool, rules: &Rules) -> Result<Features, Rejection> {
    let Some(given) = given else {
        return reject(
            ErrorClass::MissingField,
            "features must be an object of numbers",
        );
    };
    if let Some(unknown) = given.unknown {
        return Err(unknown_feature(&unknown, rules));
    }
    let mut out = Vec::with_capacity(rules.features().len());
    // Asked once per model feature, in the model's order: the order of `values`.
    let mut values = given.values.into_iter();
    let value = |name: &str| match values.next().flatten() {
        None => Ok(None),
        Some(v) if is_non_finite(&v, marked) => reject(
            ErrorClass::NonFinite,
            format!("feature {name:?} is not finite"),
        ),
        Some(Value::Number(n)) => Ok(Some(n.as_f64().unwrap_or(f64::NAN))),
        Some(other) => reject(
            ErrorClass::NonNumeric,
            format!("feature {name:?} is not a number: {other}"),
        ),
    };
    required_features(rules, value, |_, v| out.push(v))?;
    // In name order from the index, not sorted per event; a name listed twice holds one
    // value in all its columns.
    Ok(rules.features.features(&out))
}

/// Checks the model's features, each looked up by `value` (`None`: not given), are
/// present and finite, handing each to `keep`. The same checks, in the same order,
/// for every wire format.
fn required_features(
    rules: &Rules,
    mut value: impl FnMut(&str) -> Result<Option<f64>, Rejection>,
    mut keep: impl FnMut(&str, f64),
) -> Result<(), Rejection> {
    for name in rules.features() {
        let Some(v) = value(name)? else {
            return reject(
                ErrorClass::MissingField,
                format!("feature {name:?} is missing"),
            );
        };
        keep(name, finite(name, v)?);
    }
    Ok(())
}

fn unknown_feature(name: &str, rules: &Rules) -> Rejection {
    (
        ErrorClass::UnknownFeature,
        format!(
            "unknown feature {name:?}; the model takes {:?}",
            rules.features()
        ),
    )
}

fn no_unknown_feature<'a>(
    mut given: impl Iterator<Item = &'a String>,
    rules: &Rules,
) -> Result<(), Rejection> {
    match given.find(|k| !rules.features.contains(k)) {
        Some(unknown) => Err(unknown_feature(unknown, rules)),
        None => Ok(()),
    }
}

fn finite(name: &str, value: f64) -> Result<f64, Rejection> {
    match model_value(name, value) {
        Ok(_) => Ok(value),
        Err(e) => reject(ErrorClass::NonFinite, e),
    }
}

fn within_limit(len: usize, rules: &Rules) -> Result<(), Rejection> {
    if len > rules.max_bytes {
        return reject(
            ErrorClass::TooLarge,
            format!(
                "{len} bytes exceed ingest.max_event_bytes ({})",
                rules.max_bytes
            ),
        );
    }
    Ok(())
}

fn text(v: Option<Value>, marked: bool, name: &str) -> Result<Option<String>, Rejection> {
    match v {
        None => Ok(None),
        Some(v) if is_non_finite(&v, marked) => reject(
            ErrorClass::MissingField,
            format!("{name} must be non-empty text, got a non-finite number"),
        ),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(other) => reject(
            ErrorClass::MissingField,
            format!("{name} must be non-empty text, got {other}"),
        ),
    }
}

/// The id an event gets when it names none: stable under replay.
pub fn derived_event_id(origin: &Origin<'_>) -> String {
    format!("{}-{}-{}", origin.topic, origin.partition, origin.offset)
}

/// Validates one raw record. `now` is the ingestion time in epoch milliseconds.
pub fn validate(
    raw: &[u8],
    rules: &Rules,
    origin: &Origin<'_>,
    now: i64,
) -> Result<Event, Rejection> {
    within_limit(raw.len(), rules)?;
    let fields = match read_streaming(raw, rules) {
        Ok(fields) => fields,
        Err(_) => read_tree(raw, rules)?,
    };
    check(fields, rules, origin, now)
}

/// [`validate`] by the whole JSON tree alone: what it falls back to, and the reference
/// it is fuzzed against.
pub fn validate_by_tree(
    raw: &[u8],
    rules: &Rules,
    origin: &Origin<'_>,
    now: i64,
) -> Result<Event, Rejection> {
    within_limit(raw.len(), rules)?;
    check(read_tree(raw, rules)?, rules, origin, now)
}

fn check(fields: Fields, rules: &Rules, origin: &Origin<'_>, now: i64) -> Result<Event, Rejection> {
    let marked = fields.marked;
    let entity_id = text(fields.entity_id, marked, "entity_id")?
        .ok_or((ErrorClass::MissingField, "entity_id is missing".to_string()))?;
    let event_id =
        text(fields.event_id, marked, "event_id")?.unwrap_or_else(|| derived_event_id(origin));
    check_ids(&entity_id, &event_id)?;
    let kind = text(fields.kind, marked, "kind")?.unwrap_or_else(|| rules.default_kind.clone());
    let event_time = event_time(fields.event_time.as_ref(), marked, origin, now)?;
    check_client_time("event_time", event_time, now, rules.max_clock_skew_ms)
        .map_err(|e| (ErrorClass::InvalidEventTime, e))?;
    let features = features(fields.features, marked, rules)?;
    Ok(Event {
        event_id,
        entity_id,
        kind,
        event_time,
        ingested_at: now,
        features,
    })
}

/// Validates an `Event` a publisher wrote in Avro (`len` bytes on the wire) by the
/// rules raw JSON meets, with the same classes. Avro cannot leave a string out, so an
/// empty `event_id` is derived and an empty `kind` takes the default; `ingested_at` is
/// ingest's own.
pub fn validate_event(
    mut event: Event,
    len: usize,
    rules: &Rules,
    origin: &Origin<'_>,
    now: i64,
) -> Result<Event, Rejection> {
    within_limit(len, rules)?;
    if event.event_id.is_empty() {
        event.event_id = derived_event_id(origin);
    }
    check_ids(&event.entity_id, &event.event_id)?;
    if event.kind.is_empty() {
        event.kind.clone_from(&rules.default_kind);
    }
    check_client_time("event_time", event.event_time, now, rules.max_clock_skew_ms)
        .map_err(|e| (ErrorClass::InvalidEventTime, e))?;
    no_unknown_feature(event.features.keys(), rules)?;
    // The event's own map is kept: checking it needs no copy.
    required_features(
        rules,
        |name| Ok(event.features.get(name).copied()),
        |_, _| {},
    )?;
    event.ingested_at = now;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::with_limits(
            vec!["amount".into(), "hour".into()],
            300,
            "event".into(),
            300_000,
        )
    }

    const ORIGIN: Origin<'static> = Origin {
        topic: "raw",
        partition: 2,
        offset: 17,
        timestamp: Some(KAFKA_TIME),
    };
    /// 2026-11-29T10:01:00Z, a minute after the events' own times.
    const NOW: i64 = 1_795_946_460_000;
    const KAFKA_TIME: i64 = 1_795_946_455_000;

    fn check(raw: &str) -> Result<Event, Rejection> {
        validate(raw.as_bytes(), &rules(), &ORIGIN, NOW)
    }

    fn class(raw: &str) -> ErrorClass {
        check(raw).expect_err(raw).0
    }

    #[test]
    fn a_full_event_is_accepted() {
        let e = check(r#"{"event_id":"e-1","entity_id":"card-42","kind":"transaction","event_time":"2026-11-29T10:00:00Z","features":{"amount":12.5,"hour":10}}"#).unwrap();
        assert_eq!(e.event_id, "e-1");
        assert_eq!(e.entity_id, "card-42");
        assert_eq!(e.kind, "transaction");
        assert_eq!(e.event_time, 1_795_946_400_000);
        assert_eq!(e.ingested_at, NOW);
        assert_eq!(
            e.features,
            Features::from([("amount".into(), 12.5), ("hour".into(), 10.0)])
        );
    }

    #[test]
    fn features_land_under_their_names_whatever_the_models_order() {
        // The model lists its features out of name order; each value keeps its name.
        let rules = Rules::with_limits(
            ["hour", "zeta", "amount", "merchant_risk"]
                .map(String::from)
                .to_vec(),
            300,
            "event".into(),
            300_000,
        );
        let raw = r#"{"entity_id":"c","features":{"amount":1.5,"merchant_risk":0.25,"hour":7,"zeta":-3}}"#;
        let want = Features::from([
            ("amount".into(), 1.5),
            ("hour".into(), 7.0),
            ("merchant_risk".into(), 0.25),
            ("zeta".into(), -3.0),
        ]);
        let e = validate(raw.as_bytes(), &rules, &ORIGIN, NOW).unwrap();
        assert_eq!(e.features, want);
        let e = validate_by_tree(raw.as_bytes(), &rules, &ORIGIN, NOW).unwrap();
        assert_eq!(e.features, want);
    }

    #[test]
    fn optional_fields_get_deterministic_defaults() {
        let e = check(r#"{"entity_id":"c","features":{"amount":1,"hour":2}}"#).unwrap();
        assert_eq!(
            e.event_id, "raw-2-17",
            "derived from topic/partition/offset"
        );
        assert_eq!(e.event_time, KAFKA_TIME, "the Kafka timestamp");
        assert_eq!(e.kind, "event");
        let e = check(
            r#"{"entity_id":"c","event_time":1795946400123,"features":{"amount":1,"hour":2}}"#,
        )
        .unwrap();
        assert_eq!(e.event_time, 1_795_946_400_123);
    }

    #[test]
    fn each_failure_has_its_class() {
        assert_eq!(class("not json"), ErrorClass::InvalidJson);
        assert_eq!(class("[1,2]"), ErrorClass::InvalidJson);
        assert_eq!(
            class(r#"{"features":{"amount":1,"hour":2}}"#),
            ErrorClass::MissingField
        );
        assert_eq!(
            class(r#"{"entity_id":"","features":{"amount":1,"hour":2}}"#),
            ErrorClass::MissingField
        );
        assert_eq!(class(r#"{"entity_id":"c"}"#), ErrorClass::MissingField);
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":1}}"#),
            ErrorClass::MissingField
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":1,"hour":2,"zip":3}}"#),
            ErrorClass::UnknownFeature
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":"12.5","hour":2}}"#),
            ErrorClass::NonNumeric
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":true,"hour":2}}"#),
            ErrorClass::NonNumeric
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":NaN,"hour":2}}"#),
            ErrorClass::NonFinite
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":-Infinity,"hour":2}}"#),
            ErrorClass::NonFinite
        );
        assert_eq!(
            class(r#"{"entity_id":"c","event_time":"yesterday","features":{"amount":1,"hour":2}}"#),
            ErrorClass::InvalidEventTime
        );
        assert_eq!(
            class(r#"{"entity_id":"c","event_time":-5,"features":{"amount":1,"hour":2}}"#),
            ErrorClass::InvalidEventTime
        );
        let big = format!(
            r#"{{"entity_id":"{}","features":{{"amount":1,"hour":2}}}}"#,
            "x".repeat(400)
        );
        assert_eq!(class(&big), ErrorClass::TooLarge);
    }

    #[test]
    fn client_clocks_cannot_reach_far_ahead_or_before_2000() {
        let at = |t: i64| {
            format!(r#"{{"entity_id":"c","event_time":{t},"features":{{"amount":1,"hour":2}}}}"#)
        };
        assert!(check(&at(NOW + 299_000)).is_ok(), "within the allowed skew");
        assert_eq!(class(&at(NOW + 301_000)), ErrorClass::InvalidEventTime);
        assert_eq!(
            class(&at(NOW * 1000)),
            ErrorClass::InvalidEventTime,
            "microseconds"
        );
        assert_eq!(
            class(&at(NOW / 1000)),
            ErrorClass::InvalidEventTime,
            "seconds"
        );
        assert_eq!(
            class(
                r#"{"entity_id":"c","event_time":"2999-01-01T00:00:00Z","features":{"amount":1,"hour":2}}"#
            ),
            ErrorClass::InvalidEventTime
        );
        let far = Origin {
            timestamp: Some(NOW + 3_600_000),
            ..ORIGIN
        };
        let raw = r#"{"entity_id":"c","features":{"amount":1,"hour":2}}"#;
        assert_eq!(
            validate(raw.as_bytes(), &rules(), &far, NOW).unwrap_err().0,
            ErrorClass::InvalidEventTime,
            "a producer's Kafka timestamp is a client time too"
        );
    }

    #[test]
    fn values_past_the_32_bit_float_range_are_not_finite() {
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":1e39,"hour":2}}"#),
            ErrorClass::NonFinite
        );
        assert_eq!(
            class(r#"{"entity_id":"c","features":{"amount":-1e39,"hour":2}}"#),
            ErrorClass::NonFinite
        );
        assert!(check(r#"{"entity_id":"c","features":{"amount":3e38,"hour":2}}"#).is_ok());
    }

    #[test]
    fn unknown_top_level_fields_are_ignored() {
        assert!(
            check(r#"{"entity_id":"c","source":"pos-7","features":{"amount":1,"hour":2}}"#).is_ok()
        );
    }

    #[test]
    fn non_finite_words_inside_strings_are_left_alone() {
        let e = check(r#"{"entity_id":"NaN-Infinity","features":{"amount":1,"hour":2}}"#).unwrap();
        assert_eq!(e.entity_id, "NaN-Infinity");
        assert_eq!(
            class(r#"{"entity_id":"say \"NaN\"","features":{"amount":NaN,"hour":2}}"#),
            ErrorClass::NonFinite
        );
    }

    #[test]
    fn non_finite_literals_are_numbers_only_where_numbers_go() {
        // A bare `NaN` is a number, not text: it names no entity, event or kind (it
        // once became one shared stand-in id for every such event).
        for raw in [
            r#"{"entity_id":NaN,"features":{"amount":1,"hour":2}}"#,
            r#"{"entity_id":"c","event_id":Infinity,"features":{"amount":1,"hour":2}}"#,
            r#"{"entity_id":"c","kind":-Infinity,"features":{"amount":1,"hour":2}}"#,
        ] {
            let (class, message) = check(raw).unwrap_err();
            assert_eq!(class, ErrorClass::MissingField, "{raw}");
            assert!(message.contains("non-finite number"), "{message}");
        }
        assert_eq!(
            class(r#"{"entity_id":"c","event_time":NaN,"features":{"amount":1,"hour":2}}"#),
            ErrorClass::InvalidEventTime
        );
        // Where a key goes it is not JSON any writer emits.
        for raw in [
            r#"{"entity_id":"c",NaN:1,"features":{"amount":1,"hour":2}}"#,
            r#"{"entity_id":"c","features":{"amount":1,"hour":2,NaN:3}}"#,
            r#"{"entity_id":"c","x":[{Infinity:1}],"features":{"amount":1,"hour":2}}"#,
        ] {
            assert_eq!(class(raw), ErrorClass::InvalidJson, "{raw}");
        }
        // A client's text that reads like the stand-in stays text (in a record with a
        // bare literal too it is refused: never taken for a number and let through).
        let e = check(&format!(
            r#"{{"entity_id":"{NON_FINITE}","features":{{"amount":1,"hour":2}}}}"#
        ))
        .unwrap();
        assert_eq!(e.entity_id, NON_FINITE);
        assert_eq!(
            class(&format!(
                r#"{{"entity_id":"c","features":{{"amount":"{NON_FINITE}","hour":2}}}}"#
            )),
            ErrorClass::NonNumeric
        );
    }

    /// Inputs where a one-pass read could differ from the tree: repeated keys, `null`s,
    /// escapes, nesting, wrong types at every level, unknown names in either order.
    const TRICKY: &[&str] = &[
        r#"{"entity_id":"a","features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","entity_id":"b","features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","entity_id":null,"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","kind":null,"event_id":null,"event_time":null,"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":1,"amount":"x","hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":"x","amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":null}}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2},"features":null}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2},"features":[1,2]}"#,
        r#"{"entity_id":"a","features":[1,2],"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"zz":1,"amount":1,"hour":2,"b":3}}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2,"\u0062":3}}"#,
        r#"{"entity_\u0069d":"a","features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"\u00e9\"","features":{"am\u006funt":1,"hour":2}}"#,
        r#"{"entity_id":"a","x":{"y":[1,{"z":NaN}]},"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","x":[1,2,{"features":{}}],"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":7,"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","event_time":1.5,"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","event_time":{"t":1},"features":{"amount":1,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":1e39,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":Infinity,"hour":2}}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2}} trailing"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2}}  "#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2}"#,
        r#"{"entity_id":"a","features":{"amount":1,"hour":2},}"#,
        r#"{"entity_id":"a","features":"amount"}"#,
        r#"{"entity_id":"a","features":7}"#,
        r#"{"entity_id":"a"}"#,
        r#"["entity_id","a"]"#,
        r#""entity_id""#,
        r#"null"#,
        r#"{}"#,
        "",
        "\u{feff}{}",
    ];

    #[test]
    fn features_are_matched_to_slots_in_any_order_of_keys_or_names() {
        let lists: [&[&str]; 5] = [
            &["a", "b", "c", "d"],
            &["d", "c", "b", "a"],
            &["c", "a", "d", "b"],
            &["b", "a", "b", "c"],
            &["a"],
        ];
        let orders: [&[&str]; 8] = [
            &["a", "b", "c", "d"],
            &["d", "c", "b", "a"],
            &["c", "a", "d", "b"],
            &["b", "d"],
            &["a", "x", "c"],
            &["c", "b", "c", "a"],
            &["a", "a", "d"],
            &[],
        ];
        for names in lists {
            let rules = Rules::with_limits(
                names.iter().map(|n| n.to_string()).collect(),
                300,
                "event".into(),
                300_000,
            );
            for keys in orders {
                let features: Vec<String> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| format!("\"{k}\":{i}"))
                    .collect();
                let raw = format!(
                    r#"{{"entity_id":"c","features":{{{}}}}}"#,
                    features.join(",")
                );
                let fast = read_streaming(raw.as_bytes(), &rules).expect(&raw);
                assert_eq!(
                    fast,
                    read_tree(raw.as_bytes(), &rules).unwrap(),
                    "{names:?} {raw}"
                );
            }
        }
    }

    #[test]
    fn the_one_pass_read_agrees_with_the_tree() {
        let invalid: &[&[u8]] = &[
            // Inside a field ingest does not use: still not JSON.
            b"{\"x\":\"\xff\",\"entity_id\":\"a\",\"features\":{\"amount\":1,\"hour\":2}}",
            br#"{"x":"\ud800","entity_id":"a","features":{"amount":1,"hour":2}}"#,
            br#"{"x":["\udc00"],"entity_id":"a","features":{"amount":1,"hour":2}}"#,
            b"{\"x\":\"a\x01b\",\"entity_id\":\"a\",\"features\":{\"amount\":1,\"hour\":2}}",
            b"{\"entity_id\":\"\xc3\",\"features\":{\"amount\":1,\"hour\":2}}",
        ];
        for raw in TRICKY
            .iter()
            .map(|r| r.as_bytes())
            .chain(invalid.iter().copied())
        {
            assert_eq!(
                validate(raw, &rules(), &ORIGIN, NOW),
                validate_by_tree(raw, &rules(), &ORIGIN, NOW),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        for raw in invalid {
            assert_eq!(
                validate(raw, &rules(), &ORIGIN, NOW).unwrap_err().0,
                ErrorClass::InvalidJson,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn plain_events_take_the_one_pass_read() {
        // The fast read must not fall back for everyday input (or it saves nothing).
        for raw in [
            r#"{"event_id":"e-1","entity_id":"card-42","kind":"transaction","event_time":"2026-11-29T10:00:00Z","features":{"amount":12.5,"hour":10}}"#,
            r#"{"entity_id":"c","source":{"pos":[7,8]},"features":{"hour":2,"amount":1,"zip":3}}"#,
            r#"{"entity_id":"c","features":{"amount":"1","hour":null}}"#,
        ] {
            let fast = read_streaming(raw.as_bytes(), &rules()).expect(raw);
            assert_eq!(fast, read_tree(raw.as_bytes(), &rules()).unwrap(), "{raw}");
        }
        let zip = read_streaming(
            br#"{"entity_id":"c","features":{"zz":1,"amount":1,"b":2}}"#,
            &rules(),
        )
        .unwrap();
        let given = zip.features.unwrap();
        assert_eq!(
            given.unknown.as_deref(),
            Some("b"),
            "the first in sorted order"
        );
        assert_eq!(given.values, vec![Some(Value::from(1)), None]);
    }

    fn published() -> Event {
        Event {
            event_id: "e-9".into(),
            entity_id: "card-7".into(),
            kind: "transaction".into(),
            event_time: KAFKA_TIME,
            ingested_at: 12,
            features: Features::from([("amount".into(), 3.5), ("hour".into(), 9.0)]),
        }
    }

    fn avro_class(edit: impl FnOnce(&mut Event)) -> ErrorClass {
        let mut e = published();
        edit(&mut e);
        validate_event(e, 100, &rules(), &ORIGIN, NOW)
            .expect_err("rejected")
            .0
    }

    #[test]
    fn a_published_event_keeps_its_fields_and_gets_ingests_time() {
        let e = validate_event(published(), 100, &rules(), &ORIGIN, NOW).unwrap();
        assert_eq!(
            e,
            Event {
                ingested_at: NOW,
                ..published()
            }
        );
        let mut blank = published();
        blank.event_id.clear();
        blank.kind.clear();
        let e = validate_event(blank, 100, &rules(), &ORIGIN, NOW).unwrap();
        assert_eq!(e.event_id, "raw-2-17", "derived like a raw event's");
        assert_eq!(e.kind, "event");
    }

    #[test]
    fn a_published_event_fails_with_the_classes_raw_json_gets() {
        assert_eq!(
            avro_class(|e| e.entity_id.clear()),
            ErrorClass::MissingField
        );
        assert_eq!(
            avro_class(|e| {
                e.features.remove("hour");
            }),
            ErrorClass::MissingField
        );
        assert_eq!(
            avro_class(|e| {
                e.features.insert("age".into(), 1.0);
            }),
            ErrorClass::UnknownFeature
        );
        assert_eq!(
            avro_class(|e| {
                e.features.insert("amount".into(), f64::NAN);
            }),
            ErrorClass::NonFinite
        );
        assert_eq!(
            avro_class(|e| {
                e.features.insert("amount".into(), 1e39);
            }),
            ErrorClass::NonFinite
        );
        assert_eq!(
            avro_class(|e| e.event_time = NOW + 301_000),
            ErrorClass::InvalidEventTime
        );
        assert_eq!(
            avro_class(|e| e.event_time = 0),
            ErrorClass::InvalidEventTime
        );
        assert_eq!(
            validate_event(published(), 301, &rules(), &ORIGIN, NOW)
                .unwrap_err()
                .0,
            ErrorClass::TooLarge
        );
    }

    #[test]
    fn ids_past_their_limits_are_too_large_raw_or_published() {
        let rules = Rules::with_limits(
            vec!["amount".into(), "hour".into()],
            8192,
            "event".into(),
            300_000,
        );
        let raw = |entity: usize, event: usize| {
            let raw = format!(
                r#"{{"event_id":"{}","entity_id":"{}","features":{{"amount":1,"hour":2}}}}"#,
                "e".repeat(event),
                "c".repeat(entity)
            );
            validate(raw.as_bytes(), &rules, &ORIGIN, NOW)
        };
        let published = |entity: usize, event: usize| {
            let e = Event {
                entity_id: "c".repeat(entity),
                event_id: "e".repeat(event),
                ..published()
            };
            validate_event(e, 2000, &rules, &ORIGIN, NOW)
        };
        for check in [
            &raw as &dyn Fn(usize, usize) -> Result<Event, Rejection>,
            &published,
        ] {
            assert!(check(512, 1024).is_ok());
            assert_eq!(
                check(513, 1).unwrap_err(),
                (
                    ErrorClass::TooLarge,
                    "entity_id is 513 bytes, over 512".into()
                )
            );
            assert_eq!(
                check(1, 1025).unwrap_err(),
                (
                    ErrorClass::TooLarge,
                    "event_id is 1025 bytes, over 1024".into()
                )
            );
        }
        assert_eq!(published(0, 1).unwrap_err().0, ErrorClass::MissingField);
    }
}
