//! Typed Rust records for the Avro schemas in `schemas/` (namespace `lanes.v1`).
//!
//! Times are epoch milliseconds (`timestamp-millis`). The schema text is compiled in, so
//! a binary always registers the schema its code was built against.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dlq::ErrorClass;
use crate::features::{FeatureIndex, Features};

/// A record with its Avro schema.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The `.avsc` text.
    const SCHEMA_JSON: &'static str;
    /// Full name, e.g. `lanes.v1.Event`.
    const NAME: &'static str;
    /// The parsed schema.
    fn schema() -> &'static Schema;
    /// Serde straight to Avro binary with [`Record::schema`], no intermediate value.
    fn writer() -> &'static GenericDatumWriter<'static>;
    /// Avro binary written with [`Record::schema`] straight to serde.
    fn reader() -> &'static GenericDatumReader<'static>;
    /// Appends the Avro binary of `self`, written with [`Record::writer`]. Records on
    /// every event's path are handed to it as a view that serializes by position
    /// (see [`PredictionView`]); the bytes are the same.
    fn write_avro(&self, out: &mut Vec<u8>) -> Result<usize, apache_avro::Error>;
}

macro_rules! record {
    ($ty:ident, $file:literal) => {
        record!($ty, $file, |r| r);
    };
    ($ty:ident, $file:literal, |$r:ident| $written:expr) => {
        impl Record for $ty {
            fn write_avro(&self, out: &mut Vec<u8>) -> Result<usize, apache_avro::Error> {
                let $r = self;
                Self::writer().write_ser(out, &$written)
            }
            const SCHEMA_JSON: &'static str = include_str!(concat!("../../../schemas/", $file));
            const NAME: &'static str = concat!("lanes.v1.", stringify!($ty));
            fn schema() -> &'static Schema {
                static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
                    Schema::parse_str(<$ty as Record>::SCHEMA_JSON).expect(concat!(
                        "schemas/",
                        $file,
                        " is valid Avro"
                    ))
                });
                &SCHEMA
            }
            fn writer() -> &'static GenericDatumWriter<'static> {
                static WRITER: LazyLock<GenericDatumWriter<'static>> = LazyLock::new(|| {
                    GenericDatumWriter::builder(<$ty as Record>::schema())
                        .build()
                        .expect("a parsed schema resolves")
                });
                &WRITER
            }
            fn reader() -> &'static GenericDatumReader<'static> {
                static READER: LazyLock<GenericDatumReader<'static>> = LazyLock::new(|| {
                    GenericDatumReader::builder(<$ty as Record>::schema())
                        .build()
                        .expect("a parsed schema resolves")
                });
                &READER
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub entity_id: String,
    pub kind: String,
    pub event_time: i64,
    pub ingested_at: i64,
    pub features: Features,
}
record!(Event, "Event.avsc", |e| EventByPosition(e));

/// An [`Event`] serialized by position, for Avro only (see [`PredictionView`]).
struct EventByPosition<'a>(&'a Event);

impl Serialize for EventByPosition<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTupleStruct;
        let e = self.0;
        let mut t = s.serialize_tuple_struct("Event", 6)?;
        t.serialize_field(&e.event_id)?;
        t.serialize_field(&e.entity_id)?;
        t.serialize_field(&e.kind)?;
        t.serialize_field(&e.event_time)?;
        t.serialize_field(&e.ingested_at)?;
        t.serialize_field(&e.features)?;
        t.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloseReason {
    Count,
    Bytes,
    Delay,
    Flush,
    Priority,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    pub batch_id: String,
    pub source_partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub opened_at: i64,
    pub closed_at: i64,
    pub close_reason: CloseReason,
    pub feature_names: Vec<String>,
    pub features: Vec<f32>,
    pub event_ids: Vec<String>,
    pub entity_ids: Vec<String>,
    pub kinds: Vec<String>,
    pub event_times: Vec<i64>,
    pub ingested_ats: Vec<i64>,
}
record!(MicroBatch, "MicroBatch.avsc");

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Count => "COUNT",
            CloseReason::Bytes => "BYTES",
            CloseReason::Delay => "DELAY",
            CloseReason::Flush => "FLUSH",
            CloseReason::Priority => "PRIORITY",
        }
    }
}

/// The longest `batch_id` a micro-batch may carry; the micro-batcher's ids (topic,
/// partition and offsets) stay under 320 bytes.
pub const MAX_BATCH_ID_BYTES: usize = 512;

impl MicroBatch {
    /// Rows, once every column is checked to agree: any writer that can reach the batch
    /// topic could send a batch whose columns disagree, and the scorer indexes them.
    pub fn rows(&self) -> Result<usize, String> {
        // Copied into every row's prediction: half a megabyte of id over ten thousand
        // small rows would make gigabytes of one record.
        if self.batch_id.len() > MAX_BATCH_ID_BYTES {
            return Err(format!(
                "batch_id of {} bytes is over {MAX_BATCH_ID_BYTES}",
                self.batch_id.len()
            ));
        }
        let rows = self.event_ids.len();
        let width = self.feature_names.len();
        for (name, len) in [
            ("entity_ids", self.entity_ids.len()),
            ("kinds", self.kinds.len()),
            ("event_times", self.event_times.len()),
            ("ingested_ats", self.ingested_ats.len()),
        ] {
            if len != rows {
                return Err(format!("{name} has {len} values for {rows} events"));
            }
        }
        if rows.checked_mul(width) != Some(self.features.len()) {
            return Err(format!(
                "features has {} values for {rows} events of {width} features",
                self.features.len()
            ));
        }
        // The micro-batcher batches no event whose ids the cache would refuse.
        if let Some((row, (_, reason))) = (self.entity_ids.iter().zip(&self.event_ids))
            .enumerate()
            .find_map(|(row, (entity, event))| check_ids(entity, event).err().map(|e| (row, e)))
        {
            return Err(format!("row {row}: {reason}"));
        }
        Ok(rows)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Lane {
    Stream,
    Batch,
    Realtime,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Stream => "STREAM",
            Lane::Batch => "BATCH",
            Lane::Realtime => "REALTIME",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub event_id: String,
    pub entity_id: String,
    pub score: f64,
    pub label: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub lane: Lane,
    pub event_time: i64,
    pub ingested_at: Option<i64>,
    pub scored_at: i64,
    pub batch_id: Option<String>,
}
record!(Prediction, "Prediction.avsc", |p| p.view());

impl Prediction {
    pub fn view(&self) -> PredictionView<'_> {
        PredictionView {
            event_id: &self.event_id,
            entity_id: &self.entity_id,
            score: self.score,
            label: self.label.as_deref(),
            model_name: &self.model_name,
            model_version: &self.model_version,
            lane: self.lane,
            event_time: self.event_time,
            ingested_at: self.ingested_at,
            scored_at: self.scored_at,
            batch_id: self.batch_id.as_deref(),
        }
    }
}

/// A [`Prediction`] that borrows its strings, for writing many without an allocation
/// per field (see [`crate::avro::write_framed`]). Same fields, same bytes. For Avro
/// only: it serializes as a tuple struct, its fields by position in the schema's order,
/// which apache-avro writes without looking each field up by name (two hashes per
/// field, more than the encoding itself).
#[derive(Debug, Clone, Copy)]
pub struct PredictionView<'a> {
    pub event_id: &'a str,
    pub entity_id: &'a str,
    pub score: f64,
    pub label: Option<&'a str>,
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub lane: Lane,
    pub event_time: i64,
    pub ingested_at: Option<i64>,
    pub scored_at: i64,
    pub batch_id: Option<&'a str>,
}

impl Serialize for PredictionView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTupleStruct;
        let mut t = s.serialize_tuple_struct("Prediction", 11)?;
        t.serialize_field(self.event_id)?;
        t.serialize_field(self.entity_id)?;
        t.serialize_field(&self.score)?;
        t.serialize_field(&self.label)?;
        t.serialize_field(self.model_name)?;
        t.serialize_field(self.model_version)?;
        t.serialize_field(&self.lane)?;
        t.serialize_field(&self.event_time)?;
        t.serialize_field(&self.ingested_at)?;
        t.serialize_field(&self.scored_at)?;
        t.serialize_field(&self.batch_id)?;
        t.end()
    }
}

impl PredictionView<'_> {
    pub fn to_prediction(&self) -> Prediction {
        Prediction {
            event_id: self.event_id.to_string(),
            entity_id: self.entity_id.to_string(),
            score: self.score,
            label: self.label.map(str::to_string),
            model_name: self.model_name.to_string(),
            model_version: self.model_version.to_string(),
            lane: self.lane,
            event_time: self.event_time,
            ingested_at: self.ingested_at,
            scored_at: self.scored_at,
            batch_id: self.batch_id.map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRequest {
    pub request_id: String,
    pub entity_id: String,
    pub features: Option<BTreeMap<String, f64>>,
    pub max_age_ms: Option<i64>,
    pub reply_topic: Option<String>,
    pub requested_at: i64,
    /// Answer a stale entry at once and refresh it in the background; `None` follows
    /// `fallback_responder.stale_while_refresh`.
    #[serde(default)]
    pub stale_while_refresh: Option<bool>,
}
record!(PredictionRequest, "PredictionRequest.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResponseStatus {
    Ok,
    NotFound,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResponseSource {
    Cache,
    Realtime,
    StaleCache,
    None,
}

impl ResponseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseStatus::Ok => "OK",
            ResponseStatus::NotFound => "NOT_FOUND",
            ResponseStatus::Error => "ERROR",
        }
    }
}

impl ResponseSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseSource::Cache => "CACHE",
            ResponseSource::Realtime => "REALTIME",
            ResponseSource::StaleCache => "STALE_CACHE",
            ResponseSource::None => "NONE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionResponse {
    pub request_id: String,
    pub entity_id: String,
    pub status: ResponseStatus,
    pub score: Option<f64>,
    pub model_version: Option<String>,
    pub source: ResponseSource,
    pub cache_age_ms: Option<i64>,
    pub error: Option<String>,
    pub responded_at: i64,
}
record!(PredictionResponse, "PredictionResponse.avsc");

/// 2000-01-01T00:00:00Z. A client time before it is taken for a mistake (seconds since
/// the epoch, say); micro- and nanosecond epochs land far in the future instead.
pub const MIN_CLIENT_TIME_MS: i64 = 946_684_800_000;

/// Checks a time a client supplied (epoch milliseconds): not before 2000, and not more
/// than `max_skew_ms` ahead of `now`. A time that passes cannot pin a cache entry.
pub fn check_client_time(name: &str, t: i64, now: i64, max_skew_ms: u64) -> Result<(), String> {
    if t < MIN_CLIENT_TIME_MS {
        return Err(format!(
            "{name} {t} is before 2000-01-01 (epoch milliseconds expected)"
        ));
    }
    check_not_ahead(name, t, now, max_skew_ms)
}

/// Checks that a time a client supplied is not more than `max_skew_ms` ahead of `now`:
/// the half of [`check_client_time`] for times that only order or age an entry.
pub fn check_not_ahead(name: &str, t: i64, now: i64, max_skew_ms: u64) -> Result<(), String> {
    let skew = i64::try_from(max_skew_ms).unwrap_or(i64::MAX);
    if t > now.saturating_add(skew) {
        return Err(format!(
            "{name} {t} is {} ms ahead of this clock (max_clock_skew_ms {max_skew_ms}); micro- or nanoseconds?",
            t.saturating_sub(now)
        ));
    }
    Ok(())
}

/// A feature value as the model takes it: finite as a 32-bit float.
pub fn model_value(name: &str, v: f64) -> Result<f32, String> {
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(format!(
            "feature {name:?} is not finite as a 32-bit float: {v}"
        ))
    }
}

/// Why an `Event` from the events topic cannot serve the model whose features `index`
/// holds. Any writer can reach that topic past ingest's checks, so each reader checks
/// what it uses: an entity (the cache key), every feature the model takes (a missing
/// column would be scored as 0), each finite as a 32-bit float (its row would score
/// `NaN`, and JSON cannot hold it). Features the model does not take are not read.
pub fn unusable_event(event: &Event, index: &FeatureIndex) -> Option<(ErrorClass, String)> {
    if let Err(refused) = check_ids(&event.entity_id, &event.event_id) {
        return Some(refused);
    }
    // Values first (a float test each); a name is looked up only for one that fails.
    if let Some(reason) = event
        .features
        .iter()
        .filter(|(_, v)| !(**v as f32).is_finite())
        .find(|(name, _)| index.contains(name))
        .and_then(|(name, v)| model_value(name, *v).err())
    {
        return Some((ErrorClass::NonFinite, reason));
    }
    let missing = index.first_missing(event.features.keys().map(String::as_str))?;
    Some((
        ErrorClass::MissingField,
        format!("feature {missing:?} is missing"),
    ))
}

/// The longest entity id Lanes takes. It is a Redis key and a Kafka key, and the cache's
/// sweep reads keys a page at a time: ids as long as a record would make pages of
/// a hundred megabytes.
pub const MAX_ENTITY_ID_BYTES: usize = 512;

/// The longest event id: room for ids made from an entity id (the batch lane's).
pub const MAX_EVENT_ID_BYTES: usize = 1024;

/// The longest request id a responder answers: its request features warm the cache with
/// a prediction whose event id is `request-<request_id>`.
pub const MAX_REQUEST_ID_BYTES: usize = 512;

/// Why the first of `fields` (name, value, most bytes) longer than its limit is refused,
/// if one is.
pub fn over_limit<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a str, usize)>,
) -> Option<String> {
    fields
        .into_iter()
        .find(|(_, value, max)| value.len() > *max)
        .map(|(field, value, max)| format!("{field} is {} bytes, over {max}", value.len()))
}

/// Why an entity and event id cannot enter the cache, if they cannot: no entity, or an
/// id over [`MAX_ENTITY_ID_BYTES`] or [`MAX_EVENT_ID_BYTES`] (`TOO_LARGE`).
pub fn check_ids(entity_id: &str, event_id: &str) -> Result<(), (ErrorClass, String)> {
    if entity_id.is_empty() {
        return Err((ErrorClass::MissingField, "entity_id is empty".into()));
    }
    match over_limit([
        ("entity_id", entity_id, MAX_ENTITY_ID_BYTES),
        ("event_id", event_id, MAX_EVENT_ID_BYTES),
    ]) {
        Some(reason) => Err((ErrorClass::TooLarge, reason)),
        None => Ok(()),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    pub fn event() -> Event {
        Event {
            event_id: "e-1".into(),
            entity_id: "card-42".into(),
            kind: "transaction".into(),
            event_time: 1_795_000_000_000,
            ingested_at: 1_795_000_000_123,
            features: [("amount".to_string(), 12.5), ("hour".to_string(), 10.0)].into(),
        }
    }

    pub fn batch() -> MicroBatch {
        MicroBatch {
            batch_id: "p0-10-11".into(),
            source_partition: 0,
            first_offset: 10,
            last_offset: 11,
            opened_at: 1,
            closed_at: 2,
            close_reason: CloseReason::Priority,
            feature_names: vec!["amount".into(), "hour".into()],
            features: vec![1.0, 2.0, 3.5, 4.25],
            event_ids: vec!["a".into(), "b".into()],
            entity_ids: vec!["x".into(), "y".into()],
            kinds: vec!["transaction".into(), "login".into()],
            event_times: vec![5, 6],
            ingested_ats: vec![7, 8],
        }
    }

    pub fn prediction(label: Option<&str>, batch_id: Option<&str>) -> Prediction {
        Prediction {
            event_id: "e-1".into(),
            entity_id: "card-42".into(),
            score: 0.875,
            label: label.map(Into::into),
            model_name: "fraud".into(),
            model_version: "1".into(),
            lane: Lane::Realtime,
            event_time: 10,
            ingested_at: batch_id.map(|_| 11),
            scored_at: 12,
            batch_id: batch_id.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;
    use apache_avro::{from_value, to_value};

    /// Serde -> Avro binary -> serde, through the real schema, both ways the codec does:
    /// through a generic value (the converter, any writer schema) and straight (its own
    /// schema); each reads what the other wrote. (Bytes may differ: a map's entries
    /// come in any order.)
    fn roundtrip<R: Record + PartialEq + std::fmt::Debug>(r: &R) {
        let value = to_value(r).unwrap().resolve(R::schema()).unwrap();
        let bytes = GenericDatumWriter::builder(R::schema())
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let back = GenericDatumReader::builder(R::schema())
            .build()
            .unwrap()
            .read_value(&mut bytes.as_slice())
            .unwrap();
        assert_eq!(&from_value::<R>(&back).unwrap(), r);
        let direct = R::writer().write_ser_to_vec(r).unwrap();
        let mut written = Vec::new();
        r.write_avro(&mut written).unwrap();
        assert_eq!(written, direct, "{}: by position as by name", R::NAME);
        assert_eq!(
            &R::reader().read_deser::<R>(&mut direct.as_slice()).unwrap(),
            r
        );
        assert_eq!(
            &R::reader().read_deser::<R>(&mut bytes.as_slice()).unwrap(),
            r
        );
        let via_value = GenericDatumReader::builder(R::schema())
            .build()
            .unwrap()
            .read_value(&mut direct.as_slice())
            .unwrap();
        assert_eq!(&from_value::<R>(&via_value).unwrap(), r, "{}", R::NAME);
    }

    #[test]
    fn every_record_roundtrips_through_its_schema() {
        roundtrip(&event());
        roundtrip(&batch());
        roundtrip(&prediction(None, None));
        roundtrip(&prediction(Some("fraud"), Some("p0-1-2")));
        roundtrip(&PredictionRequest {
            request_id: "r".into(),
            entity_id: "e".into(),
            features: Some([("amount".to_string(), 1.0)].into()),
            max_age_ms: Some(500),
            reply_topic: None,
            requested_at: 3,
            stale_while_refresh: None,
        });
        for (status, source) in [
            (ResponseStatus::Ok, ResponseSource::StaleCache),
            (ResponseStatus::NotFound, ResponseSource::None),
            (ResponseStatus::Error, ResponseSource::Realtime),
        ] {
            roundtrip(&PredictionResponse {
                request_id: "r".into(),
                entity_id: "e".into(),
                status,
                score: None,
                model_version: Some("2".into()),
                source,
                cache_age_ms: Some(17),
                error: None,
                responded_at: 4,
            });
        }
    }

    #[test]
    fn a_prediction_view_writes_the_bytes_of_its_prediction() {
        for p in [
            prediction(None, None),
            prediction(Some("fraud"), Some("p0-1-2")),
        ] {
            let view = p.view();
            let (mut owned, mut viewed) = (Vec::new(), vec![9]);
            crate::avro::write_framed::<Prediction, _>(7, &p, &mut owned).unwrap();
            crate::avro::write_framed::<Prediction, _>(7, &view, &mut viewed).unwrap();
            assert_eq!(viewed[0], 9, "appends");
            assert_eq!(owned, viewed[1..]);
            assert_eq!(owned[..5], [0, 0, 0, 0, 7]);
            assert_eq!(view.to_prediction(), p);
            assert_eq!(
                Prediction::reader()
                    .read_deser::<Prediction>(&mut &owned[5..])
                    .unwrap(),
                p
            );
        }
    }

    #[test]
    fn feature_maps_in_any_order_read_as_by_inserts() {
        let json = r#"{"event_id":"e","entity_id":"c","kind":"k","event_time":1,"ingested_at":2,
            "features":{"zeta":1.0,"amount":2.0,"hour":3.0,"amount":4.0}}"#;
        let read: Event = serde_json::from_str(json).unwrap();
        let mut by_inserts = BTreeMap::new();
        for (k, v) in [
            ("zeta", 1.0),
            ("amount", 2.0),
            ("hour", 3.0),
            ("amount", 4.0),
        ] {
            by_inserts.insert(k.to_string(), v);
        }
        assert_eq!(
            read.features,
            Features::from(by_inserts),
            "sorted, the last of a repeated key"
        );
        let mut many = event();
        many.features = (0..100)
            .rev()
            .map(|i| (format!("f{i}"), f64::from(i)))
            .collect();
        roundtrip(&many);
    }

    #[test]
    fn names_match_schemas() {
        for (name, schema) in [
            (Event::NAME, Event::schema()),
            (MicroBatch::NAME, MicroBatch::schema()),
            (Prediction::NAME, Prediction::schema()),
            (PredictionRequest::NAME, PredictionRequest::schema()),
            (PredictionResponse::NAME, PredictionResponse::schema()),
        ] {
            match schema {
                Schema::Record(r) => assert_eq!(r.name.fullname(None), name),
                other => panic!("{name} is not a record: {other:?}"),
            }
        }
    }

    #[test]
    fn a_batch_whose_columns_disagree_is_refused() {
        let good = batch();
        assert_eq!(good.rows(), Ok(good.event_ids.len()));
        let mut b = batch();
        b.entity_ids.pop();
        assert!(b.rows().unwrap_err().contains("entity_ids"));
        let mut b = batch();
        b.features.push(1.0);
        assert!(b.rows().unwrap_err().contains("features"));
        let mut b = batch();
        b.ingested_ats.clear();
        assert!(b.rows().is_err());
        let mut b = batch();
        b.feature_names.push("extra".into());
        assert!(b.rows().is_err());
        let mut b = batch();
        b.batch_id = "b".repeat(MAX_BATCH_ID_BYTES);
        assert!(b.rows().is_ok());
        b.batch_id.push('b');
        assert!(b.rows().unwrap_err().contains("batch_id of 513 bytes"));
        let mut b = batch();
        b.entity_ids[0] = "c".repeat(MAX_ENTITY_ID_BYTES + 1);
        assert_eq!(
            b.rows().unwrap_err(),
            "row 0: entity_id is 513 bytes, over 512"
        );
        let mut b = batch();
        b.entity_ids[0].clear();
        assert!(b.rows().unwrap_err().contains("entity_id is empty"));
    }

    #[test]
    fn ids_are_checked_at_their_limits() {
        let (entity, event) = (
            "c".repeat(MAX_ENTITY_ID_BYTES),
            "e".repeat(MAX_EVENT_ID_BYTES),
        );
        assert_eq!(check_ids(&entity, &event), Ok(()));
        assert_eq!(
            check_ids("c", ""),
            Ok(()),
            "an event id may be derived later"
        );
        assert_eq!(check_ids("", "e").unwrap_err().0, ErrorClass::MissingField);
        let refused = check_ids(&format!("{entity}c"), "e").unwrap_err();
        assert_eq!(refused.0, ErrorClass::TooLarge);
        assert_eq!(refused.1, "entity_id is 513 bytes, over 512");
        let refused = check_ids("c", &format!("{event}é")).unwrap_err();
        assert_eq!(
            refused,
            (
                ErrorClass::TooLarge,
                "event_id is 1026 bytes, over 1024".into()
            )
        );
    }
}
