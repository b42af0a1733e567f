//! The dead-letter convention: a record that will never process is written to the DLQ
//! topic with its original key and value bytes untouched and the reason in headers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use prometheus::IntCounterVec;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::records::now_millis;

pub const HEADER_CLASS: &str = "lanes.error.class";
pub const HEADER_MESSAGE: &str = "lanes.error.message";
pub const HEADER_STAGE: &str = "lanes.error.stage";
pub const HEADER_SOURCE_TOPIC: &str = "lanes.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "lanes.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "lanes.source.offset";
pub const HEADER_FAILED_AT: &str = "lanes.failed_at";

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
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 11] = [
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
    producer: FutureProducer,
    topic: String,
    stage: String,
    counter: Option<IntCounterVec>,
}

impl DlqWriter {
    pub fn new(
        producer: FutureProducer,
        topic: impl Into<String>,
        stage: impl Into<String>,
    ) -> Self {
        Self {
            producer,
            topic: topic.into(),
            stage: stage.into(),
            counter: None,
        }
    }

    /// Counts each dead letter in `counter`, labelled by error class.
    pub fn with_counter(mut self, counter: IntCounterVec) -> Self {
        let classes: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
        crate::metrics::zeroed(&counter, &classes);
        self.counter = Some(counter);
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers a dead letter carries.
    pub fn headers(&self, dl: &DeadLetter<'_>) -> OwnedHeaders {
        let partition = dl.source_partition.to_string();
        let offset = dl.source_offset.to_string();
        let failed_at = now_millis().to_string();
        OwnedHeaders::new_with_capacity(7)
            .insert(h(HEADER_CLASS, dl.class.as_str()))
            .insert(h(HEADER_MESSAGE, &dl.message))
            .insert(h(HEADER_STAGE, &self.stage))
            .insert(h(HEADER_SOURCE_TOPIC, dl.source_topic))
            .insert(h(HEADER_SOURCE_PARTITION, &partition))
            .insert(h(HEADER_SOURCE_OFFSET, &offset))
            .insert(h(HEADER_FAILED_AT, &failed_at))
    }

    /// Produces the dead letter and waits for the broker's acknowledgement, retrying
    /// transient failures with backoff (the source offset must not be committed before).
    pub async fn send(&self, dl: &DeadLetter<'_>) -> Result<(), KafkaError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(self.headers(dl));
            if let Some(k) = dl.key {
                record = record.key(k);
            }
            if let Some(v) = dl.value {
                record = record.payload(v);
            }
            match self.producer.send(record, Timeout::Never).await {
                Ok(_) => break,
                Err((e, _)) if is_retriable(&e) => {
                    tracing::warn!(error = %e, topic = %self.topic, "dead letter not acknowledged, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
        tracing::info!(
            class = %dl.class, source_topic = dl.source_topic, partition = dl.source_partition,
            offset = dl.source_offset, reason = %dl.message, "dead-lettered"
        );
        if let Some(c) = &self.counter {
            c.with_label_values(&[dl.class.as_str()]).inc();
        }
        Ok(())
    }
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// Failures that may pass: timeouts, broker or queue trouble; not oversize or auth.
pub fn is_retriable(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::UnknownTopicOrPartition,
        ) => false,
        Some(_) | None => true,
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
}
