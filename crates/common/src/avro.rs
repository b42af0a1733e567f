//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro
//! binary) through `schema_registry_converter`, with TopicNameStrategy subjects
//! (`<topic>-value`).
//!
//! Encoding registers the record's compiled-in schema once per subject and caches the
//! id; decoding fetches a writer schema once per id and caches it. Decode failures are
//! split into poison (dead-letter the record) and transient (retry, never dead-letter).

use std::sync::Arc;
use std::time::Duration;

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use tokio_util::sync::CancellationToken;

use crate::config::RegistryConfig;
use crate::dlq::ErrorClass;
use crate::records::Record;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes will never decode: dead-letter them with `class`.
    #[error("{class}: {message}")]
    Poison { class: ErrorClass, message: String },
    /// The registry could not be asked; retry later, keep the record.
    #[error("transient: {0}")]
    Transient(String),
}

impl DecodeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::Transient(_))
    }
    fn poison(class: ErrorClass, message: impl Into<String>) -> Self {
        DecodeError::Poison {
            class,
            message: message.into(),
        }
    }
}

/// Why a record could not be encoded. Our own records fail only when the registry is
/// unreachable (retry) or refuses the schema (an operator must act).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EncodeError {
    pub retriable: bool,
    pub message: String,
}

/// A decoded record and the id of the schema it was written with.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<R> {
    pub record: R,
    pub schema_id: u32,
}

/// Encoder and decoder sharing one registry configuration; cheap to clone.
#[derive(Clone)]
pub struct AvroCodec {
    encoder: Arc<AvroEncoder>,
    decoder: Arc<AvroDecoder>,
}

impl std::fmt::Debug for AvroCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroCodec").finish_non_exhaustive()
    }
}

fn sr_settings(cfg: &RegistryConfig) -> Result<SrSettings, SRCError> {
    let mut b = SrSettings::new_builder(cfg.url.clone());
    b.set_timeout(Duration::from_millis(cfg.timeout_ms));
    if let Some(user) = &cfg.basic_auth_user {
        b.set_basic_authorization(user, cfg.basic_auth_password.as_ref().map(|p| p.expose()));
    }
    b.build()
}

impl AvroCodec {
    pub fn new(cfg: &RegistryConfig) -> Result<Self, EncodeError> {
        let settings = sr_settings(cfg).map_err(|e| EncodeError {
            retriable: false,
            message: format!("schema registry client: {e}"),
        })?;
        Ok(Self {
            encoder: Arc::new(AvroEncoder::new(settings.clone())),
            decoder: Arc::new(AvroDecoder::new(settings)),
        })
    }

    /// Encodes `record` for `topic`, registering its schema under `<topic>-value` on
    /// first use.
    pub async fn encode<R: Record>(&self, topic: &str, record: &R) -> Result<Vec<u8>, EncodeError> {
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_string(),
            false,
            SuppliedSchema::new(
                Some(R::NAME.to_string()),
                SchemaType::Avro,
                R::SCHEMA_JSON.to_string(),
            ),
        );
        self.encoder
            .encode_struct(record, &strategy)
            .await
            .map_err(|e| EncodeError {
                retriable: e.retriable,
                message: format!("encode {} for {topic}: {}", R::NAME, describe(&e)),
            })
    }

    /// Like [`AvroCodec::encode`], retrying with backoff while the registry is
    /// unreachable, until `stop` is cancelled. A refused schema is returned at once.
    pub async fn encode_retrying<R: Record>(
        &self,
        topic: &str,
        record: &R,
        stop: &CancellationToken,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.encode(topic, record).await {
                Err(e) if e.retriable && !stop.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "schema registry unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Decodes Confluent-framed bytes into `R`.
    pub async fn decode<R: Record>(&self, bytes: &[u8]) -> Result<Decoded<R>, DecodeError> {
        let schema_id = check_framing(bytes)?;
        let decoded = match self.decoder.decode(Some(bytes)).await {
            Ok(d) => d,
            Err(e) => {
                let err = classify(&e);
                if err.is_transient() {
                    // The decoder caches non-retriable errors; an HTTP 500 must not stick.
                    self.decoder.remove_errors_from_cache();
                }
                return Err(err);
            }
        };
        let record = apache_avro::from_value::<R>(&decoded.value).map_err(|e| {
            DecodeError::poison(
                ErrorClass::DecodeError,
                format!("schema id {schema_id} does not fit {}: {e}", R::NAME),
            )
        })?;
        Ok(Decoded { record, schema_id })
    }

    /// Decodes Confluent-framed bytes of any registered schema into JSON (for tools).
    pub async fn decode_json(&self, bytes: &[u8]) -> Result<(serde_json::Value, u32), DecodeError> {
        let schema_id = check_framing(bytes)?;
        let decoded = self
            .decoder
            .decode(Some(bytes))
            .await
            .map_err(|e| classify(&e))?;
        let json = serde_json::Value::try_from(decoded.value)
            .map_err(|e| DecodeError::poison(ErrorClass::DecodeError, e.to_string()))?;
        Ok((json, schema_id))
    }

    /// Like [`AvroCodec::decode`], retrying with backoff while the registry is
    /// unreachable. Returns poison at once, and a transient error only once `stop` is
    /// cancelled, so the caller can stop without acknowledging the record.
    pub async fn decode_retrying<R: Record>(
        &self,
        bytes: &[u8],
        stop: &CancellationToken,
    ) -> Result<Decoded<R>, DecodeError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.decode(bytes).await {
                Err(DecodeError::Transient(e)) if !stop.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "schema registry unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }
}

/// The magic byte and schema id, before any registry call.
pub fn check_framing(bytes: &[u8]) -> Result<u32, DecodeError> {
    match bytes {
        [] => Err(DecodeError::poison(ErrorClass::DecodeError, "empty value")),
        [magic, ..] if *magic != 0 => Err(DecodeError::poison(
            ErrorClass::InvalidMagicByte,
            format!("first byte is {magic:#04x}, not the Confluent magic byte 0x00"),
        )),
        [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(DecodeError::poison(
            ErrorClass::DecodeError,
            format!(
                "{} bytes: too short for the 5-byte Confluent header",
                bytes.len()
            ),
        )),
    }
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(cause) => format!("{} ({cause})", e.error),
        None => e.error.clone(),
    }
}

/// Maps a converter error onto poison or transient.
fn classify(e: &SRCError) -> DecodeError {
    let message = describe(e);
    if e.retriable {
        return DecodeError::Transient(message);
    }
    if let Some(status) = http_status(&e.error) {
        return match status {
            // The registry answered: this id does not exist, and never will.
            404 => DecodeError::poison(ErrorClass::UnknownSchemaId, message),
            // Auth, rate limits and server errors are the registry's problem, not the record's.
            _ => DecodeError::Transient(message),
        };
    }
    DecodeError::poison(ErrorClass::DecodeError, message)
}

/// The status in "HTTP request to schema registry failed with status 404 Not Found".
fn http_status(error: &str) -> Option<u16> {
    let rest = error.split("failed with status ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_classifies_magic_byte_and_truncation() {
        assert_eq!(check_framing(&[0, 0, 0, 1, 2, 9]), Ok(258));
        assert!(matches!(
            check_framing(&[1, 0, 0, 0, 1, 2]),
            Err(DecodeError::Poison {
                class: ErrorClass::InvalidMagicByte,
                ..
            })
        ));
        assert!(matches!(
            check_framing(b"{\"json\": true}"),
            Err(DecodeError::Poison {
                class: ErrorClass::InvalidMagicByte,
                ..
            })
        ));
        for short in [&[][..], &[0][..], &[0, 0, 0, 1][..]] {
            assert!(matches!(
                check_framing(short),
                Err(DecodeError::Poison {
                    class: ErrorClass::DecodeError,
                    ..
                })
            ));
        }
    }

    #[test]
    fn converter_errors_are_classified() {
        let not_found = SRCError::new(
            "HTTP request to schema registry failed with status 404 Not Found",
            None,
            false,
        );
        assert!(matches!(
            classify(&not_found),
            DecodeError::Poison {
                class: ErrorClass::UnknownSchemaId,
                ..
            }
        ));
        let server = SRCError::new(
            "HTTP request to schema registry failed with status 500 Internal Server Error",
            None,
            false,
        );
        assert!(classify(&server).is_transient());
        let unreachable = SRCError::new("http call to schema registry failed", None, true);
        assert!(classify(&unreachable).is_transient());
        let bad = SRCError::new("Could not transform bytes using schema", None, false);
        assert!(matches!(
            classify(&bad),
            DecodeError::Poison {
                class: ErrorClass::DecodeError,
                ..
            }
        ));
    }
}
