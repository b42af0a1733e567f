//! The dead-letter convention: a record that will never process is written to the DLQ
//! topic with its original key and value bytes untouched and the reason in headers.

use std::fmt;
use std::str::FromStr;

use prometheus::IntCounterVec;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::producer::Producer;
use tokio_util::sync::CancellationToken;

use crate::records::now_millis;

pub const HEADER_CLASS: &str = "lanes.error.class";
pub const HEADER_MESSAGE: &str = "lanes.error.message";
pub const HEADER_STAGE: &str = "lanes.error.stage";
pub const HEADER_SOURCE_TOPIC: &str = "lanes.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "lanes.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "lanes.source.offset";
pub const HEADER_FAILED_AT: &str = "lanes.failed_at";
/// Set only on a letter cut to fit `message.max.bytes`: the input's original sizes.
pub const HEADER_ORIGINAL_KEY_SIZE: &str = "lanes.original.key_size";
pub const HEADER_ORIGINAL_VALUE_SIZE: &str = "lanes.original.value_size";

/// Why a record was dead-lettered; the `lanes.error.class` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    InvalidJson,
    MissingField,
    UnknownFeature,
    NonNumeric,
    NonFinite,
    InvalidEventTime,
    TooLarge,
    InvalidMagicByte,
    UnknownSchemaId,
    DecodeError,
    ModelError,
    ProduceError,
    CacheWriteError,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 13] = [
        ErrorClass::InvalidJson,
        ErrorClass::MissingField,
        ErrorClass::UnknownFeature,
        ErrorClass::NonNumeric,
        ErrorClass::NonFinite,
        ErrorClass::InvalidEventTime,
        ErrorClass::TooLarge,
        ErrorClass::InvalidMagicByte,
        ErrorClass::UnknownSchemaId,
        ErrorClass::DecodeError,
        ErrorClass::ModelError,
        ErrorClass::ProduceError,
        ErrorClass::CacheWriteError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidJson => "INVALID_JSON",
            ErrorClass::MissingField => "MISSING_FIELD",
            ErrorClass::UnknownFeature => "UNKNOWN_FEATURE",
            ErrorClass::NonNumeric => "NON_NUMERIC",
            ErrorClass::NonFinite => "NON_FINITE",
            ErrorClass::InvalidEventTime => "INVALID_EVENT_TIME",
            ErrorClass::TooLarge => "TOO_LARGE",
            ErrorClass::InvalidMagicByte => "INVALID_MAGIC_BYTE",
            ErrorClass::UnknownSchemaId => "UNKNOWN_SCHEMA_ID",
            ErrorClass::DecodeError => "DECODE_ERROR",
            ErrorClass::ModelError => "MODEL_ERROR",
            ErrorClass::ProduceError => "PRODUCE_ERROR",
            ErrorClass::CacheWriteError => "CACHE_WRITE_ERROR",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for ErrorClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorClass::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown error class {s:?}"))
    }
}

/// One record that failed, and where it came from.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub class: ErrorClass,
    pub message: String,
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// Writes dead letters for one service (`stage`) and counts them by class.
#[derive(Clone)]
pub struct DlqWriter {
    producer: Producer,
    topic: String,
    stage: String,
    counter: Option<IntCounterVec>,
    max_bytes: usize,
}

/// Key and value as sent, and their original sizes when they were cut.
type Fitted<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, Option<(usize, usize)>);

/// Room kept under `message.max.bytes` for the record's own framing.
const RECORD_OVERHEAD: usize = 512;
/// The reason header is ours, but it may quote input; it never crowds out the value.
const MAX_REASON_BYTES: usize = 4096;

impl DlqWriter {
    pub fn new(producer: Producer, topic: impl Into<String>, stage: impl Into<String>) -> Self {
        Self {
            producer,
            topic: topic.into(),
            stage: stage.into(),
            counter: None,
            max_bytes: 1_000_000,
        }
    }

    /// Counts each dead letter in `counter`, labelled by error class.
    pub fn with_counter(mut self, counter: IntCounterVec) -> Self {
        let classes: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
        crate::metrics::zeroed(&counter, &classes);
        self.counter = Some(counter);
        self
    }

    /// The producer's `message.max.bytes`: larger letters are cut to fit.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers a dead letter carries; `original` sizes name what was cut to fit.
    pub fn headers(&self, dl: &DeadLetter<'_>, original: Option<(usize, usize)>) -> OwnedHeaders {
        let partition = dl.source_partition.to_string();
        let offset = dl.source_offset.to_string();
        let failed_at = now_millis().to_string();
        let headers = OwnedHeaders::new_with_capacity(9)
            .insert(h(HEADER_CLASS, dl.class.as_str()))
            .insert(h(
                HEADER_MESSAGE,
                truncate_str(&dl.message, MAX_REASON_BYTES),
            ))
            .insert(h(HEADER_STAGE, &self.stage))
            .insert(h(HEADER_SOURCE_TOPIC, dl.source_topic))
            .insert(h(HEADER_SOURCE_PARTITION, &partition))
            .insert(h(HEADER_SOURCE_OFFSET, &offset))
            .insert(h(HEADER_FAILED_AT, &failed_at));
        match original {
            Some((key, value)) => headers
                .insert(h(HEADER_ORIGINAL_KEY_SIZE, &key.to_string()))
                .insert(h(HEADER_ORIGINAL_VALUE_SIZE, &value.to_string())),
            None => headers,
        }
    }

    /// Key and value as sent: untouched, unless together with the headers they would
    /// pass `message.max.bytes`; then cut to fit, with their original sizes returned.
    fn fit<'a>(&self, dl: &DeadLetter<'a>) -> Fitted<'a> {
        let (key, value) = (dl.key.unwrap_or_default(), dl.value.unwrap_or_default());
        let reason = dl.message.len().min(MAX_REASON_BYTES);
        // Every header name and value we write, the two size headers included.
        let headers = 512 + reason + self.stage.len() + dl.source_topic.len();
        let room = self.max_bytes.saturating_sub(RECORD_OVERHEAD + headers);
        if key.len() + value.len() <= room {
            return (dl.key, dl.value, None);
        }
        let key_room = key.len().min(room / 4);
        let value_room = value.len().min(room - key_room);
        (
            dl.key.map(|k| &k[..key_room]),
            dl.value.map(|v| &v[..value_room]),
            Some((key.len(), value.len())),
        )
    }

    /// Produces the dead letter and waits for the broker's acknowledgement, retrying
    /// transient failures with backoff (the source offset must not be committed before).
    pub async fn send(&self, dl: &DeadLetter<'_>) -> Result<(), KafkaError> {
        let (key, value, original) = self.fit(dl);
        // Waited for until the broker takes it (the input stays uncommitted meanwhile);
        // a stopping service is bounded by its drain deadline.
        let forever = CancellationToken::new();
        crate::retry::retrying("dead letter", &forever, || async {
            let mut record =
                FutureRecord::<[u8], [u8]>::to(&self.topic).headers(self.headers(dl, original));
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(v) = value {
                record = record.payload(v);
            }
            self.producer.send(record).await.map(|_| ())
        })
        .await?;
        // The reason may quote the input; at info only its class and where it came from.
        tracing::info!(
            class = %dl.class, source_topic = dl.source_topic, partition = dl.source_partition,
            offset = dl.source_offset, truncated = original.is_some(), "dead-lettered"
        );
        tracing::debug!(reason = %dl.message, "dead letter reason");
        if let Some(c) = &self.counter {
            c.with_label_values(&[dl.class.as_str()]).inc();
        }
        Ok(())
    }
}

/// A dead letter's reason from `args`, cut at [`MAX_REASON_BYTES`] while it is
/// written: an error may print a whole decoded value (apache-avro's do), as much text
/// as the value has items. Formatting stops at the cut.
pub fn reason(args: std::fmt::Arguments<'_>) -> String {
    struct Capped(String);
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = MAX_REASON_BYTES - self.0.len();
            if s.len() <= room {
                self.0.push_str(s);
                Ok(())
            } else {
                self.0.push_str(truncate_str(s, room));
                Err(std::fmt::Error)
            }
        }
    }
    let mut out = Capped(String::new());
    let _ = std::fmt::write(&mut out, args);
    out.0
}

/// `message` cut at [`MAX_REASON_BYTES`], as the header will be, in an allocation of
/// its own size (a truncated `String` keeps all it had).
pub fn cut_reason(message: String) -> String {
    if message.len() <= MAX_REASON_BYTES {
        return message;
    }
    truncate_str(&message, MAX_REASON_BYTES).to_owned()
}

/// The longest prefix of `s` within `max` bytes, cut on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// A header's value as text, for readers of dead letters.
pub fn header_str<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason stops being written at its cut, even from an error that prints a whole
    /// decoded value: apache-avro's resolution error for a megabyte of items.
    #[test]
    fn a_reason_is_cut_while_it_is_written() {
        use apache_avro::Schema;
        use apache_avro::types::Value;
        struct Counted<'a>(&'a std::cell::Cell<usize>);
        impl std::fmt::Display for Counted<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                for _ in 0..1_000_000 {
                    self.0.set(self.0.get() + 1);
                    f.write_str("é")?;
                }
                Ok(())
            }
        }
        let writes = std::cell::Cell::new(0);
        let cut = super::reason(format_args!("x{}", Counted(&writes)));
        assert_eq!(cut.len(), MAX_REASON_BYTES - 1, "cut at a char boundary");
        assert!(writes.get() <= MAX_REASON_BYTES, "{} writes", writes.get());

        let items = Value::Array(vec![Value::Boolean(true); 1_000_000]);
        let e = items
            .resolve(&Schema::map(Schema::Boolean).build())
            .unwrap_err();
        let whole = e.to_string().len();
        assert!(
            whole > 1_000_000,
            "the error holds the value: {whole} bytes"
        );
        assert_eq!(super::reason(format_args!("{e}")).len(), MAX_REASON_BYTES);
        let cut = super::cut_reason("é".repeat(MAX_REASON_BYTES));
        assert_eq!(cut.len(), MAX_REASON_BYTES);
        assert!(cut.capacity() < 2 * MAX_REASON_BYTES, "the long one let go");
    }

    #[test]
    fn classes_roundtrip_through_their_names() {
        for c in ErrorClass::ALL {
            assert_eq!(c.as_str().parse::<ErrorClass>(), Ok(c));
        }
        assert_eq!(
            "model_error".parse::<ErrorClass>(),
            Ok(ErrorClass::ModelError)
        );
        assert!("NOPE".parse::<ErrorClass>().is_err());
    }

    fn letter<'a>(key: &'a [u8], value: &'a [u8]) -> DeadLetter<'a> {
        DeadLetter {
            class: ErrorClass::TooLarge,
            message: "x".repeat(10_000),
            source_topic: "lanes.events.raw",
            source_partition: 0,
            source_offset: 7,
            key: Some(key),
            value: Some(value),
        }
    }

    #[tokio::test]
    async fn a_letter_that_would_pass_the_limit_is_cut_to_fit() {
        let mut kafka = crate::Settings::load_from(None, Default::default())
            .unwrap()
            .kafka;
        kafka.bootstrap_servers = "127.0.0.1:1".into();
        let producer = crate::kafka::producer(&kafka, "test").unwrap();
        let w = DlqWriter::new(producer, "dlq", "ingest").with_max_bytes(100_000);
        let (key, small, big) = (vec![1u8; 40], vec![2u8; 1000], vec![3u8; 99_000]);
        let (k, v, original) = w.fit(&letter(&key, &small));
        assert_eq!(
            (k.unwrap().len(), v.unwrap().len(), original),
            (40, 1000, None)
        );
        let (k, v, original) = w.fit(&letter(&key, &big));
        assert_eq!(original, Some((40, 99_000)));
        assert_eq!(k.unwrap(), &key[..], "a small key is kept whole");
        let headers = w.headers(&letter(&key, &big), original);
        let sent: usize = k.unwrap().len()
            + v.unwrap().len()
            + headers
                .iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum::<usize>();
        assert!(sent + RECORD_OVERHEAD <= 100_000, "{sent} bytes do not fit");
        assert!(v.unwrap().len() > 90_000, "the value keeps what fits");
        assert_eq!(
            header_str(&headers, HEADER_ORIGINAL_VALUE_SIZE),
            Some("99000")
        );
        assert_eq!(
            header_str(&headers, HEADER_MESSAGE).map(str::len),
            Some(MAX_REASON_BYTES)
        );
    }
}
