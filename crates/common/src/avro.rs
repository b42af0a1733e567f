//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro
//! binary) through `schema_registry_converter`, with TopicNameStrategy subjects
//! (`<topic>-value`).
//!
//! Encoding registers the record's compiled-in schema once per subject and caches the
//! id; decoding fetches a writer schema once per id and caches it, up to
//! `registry.max_writer_schemas` of them and [`MAX_WRITER_SCHEMA_BYTES`] of their text.
//! Decode failures are split into poison (dead-letter the record) and transient (retry,
//! never dead-letter).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::avro_common::AvroSchema;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use tokio_util::sync::CancellationToken;

use crate::FastMap;
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
    /// Registration goes straight to the registry: the converter's encoder keeps every
    /// subject it ever saw, and reply topics are chosen by clients.
    registry: Arc<SrSettings>,
    /// Held while registering, with the subjects whose registration failed lately: a
    /// burst of first encodes for one subject makes one registry call, and one that
    /// keeps failing (a subject holding another schema, refused rights) at most one a
    /// [`REGISTER_RETRY_AFTER`]. Registrations of different subjects wait for each
    /// other; each service has its own codec.
    registering: Arc<tokio::sync::Mutex<FailedRegistrations>>,
    /// The converter's decoder, which keeps every writer schema it fetched: replaced by
    /// an empty one when [`Known::writers`] is full. A record of our own schema is read
    /// without it.
    decoder: Arc<RwLock<Arc<AvroDecoder>>>,
    unknown: Arc<Mutex<UnknownIds>>,
    known: Arc<RwLock<Known>>,
    /// `registry.max_writer_schemas`.
    max_writers: usize,
}

/// Registrations that failed lately, by topic and record: when, and how.
type FailedRegistrations = HashMap<(String, &'static str), (Instant, EncodeError)>;

/// What the registry has already answered about our own records, so the hot path skips
/// the converter: no subject strategy or schema text cloned per record, no generic
/// Avro value in between, no lock but one read lock.
#[derive(Default)]
struct Known {
    /// The schema id of each record type under each topic's subject.
    ids: FastMap<String, FastMap<&'static str, u32>>,
    /// Whether a writer schema id reads as a record type's own schema (same Parsing
    /// Canonical Form, so the same binary layout).
    own: FastMap<(u32, &'static str), bool>,
    /// Why a writer schema id is not read, if it is not ([`unreadable`]), walked once
    /// per id: the ids the decoder holds.
    unreadable: FastMap<u32, Option<&'static str>>,
    /// What the decoder holds.
    writers: WriterBudget,
}

/// The most writer schema text a codec keeps. Anyone who can register schemas can
/// register many of up to the registry's body limit (1 MiB) and write one small record
/// of each; a parsed schema takes several times its text.
pub const MAX_WRITER_SCHEMA_BYTES: usize = 2 << 20;

/// The verdict on a writer schema id the registry answered for good with an error that is
/// not "not found" (a schema the converter cannot parse, of another type).
const NOT_FETCHED: &str = "could not be fetched and parsed (see its first dead letter)";

/// The error for a record of writer schema `schema_id`, judged unreadable for `why`.
fn not_read(schema_id: u32, why: &str) -> DecodeError {
    DecodeError::poison(
        ErrorClass::DecodeError,
        format!("schema id {schema_id} {why}; not read"),
    )
}

/// Writer schemas fetched by id and kept, by count and by text size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterBudget {
    pub schemas: usize,
    pub bytes: usize,
}

impl WriterBudget {
    /// Counts a newly fetched schema of `bytes`; false when it does not fit under
    /// `max_schemas` and [`MAX_WRITER_SCHEMA_BYTES`] beside those already kept, so
    /// the cache is to start over from it. A schema larger than the whole budget is
    /// kept alone.
    pub fn admit(&mut self, bytes: usize, max_schemas: usize) -> bool {
        let fits = self.schemas == 0
            || (self.schemas < max_schemas
                && self.bytes.saturating_add(bytes) <= MAX_WRITER_SCHEMA_BYTES);
        if !fits {
            *self = Self::default();
        }
        self.schemas += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        fits
    }
}

/// How long a failed registration is answered with its error before the registry is
/// asked again.
pub const REGISTER_RETRY_AFTER: Duration = Duration::from_secs(1);

/// For how long after a schema id is first found missing it is asked for again: a
/// producer may have registered it a moment after writing (another registry replica,
/// a lagging cache).
pub const UNKNOWN_ID_RECHECK: Duration = Duration::from_secs(3);
/// How long a missing id is then taken as missing without asking; after that it is
/// rechecked again, so an id registered later is found.
pub const UNKNOWN_ID_FORGET: Duration = Duration::from_secs(60);
/// How many newly missing ids get the recheck window per [`UNKNOWN_ID_FORGET`]. A
/// record waiting for its id holds up its whole service, so without a bound a producer
/// writing a new unregistered id every few seconds would hold it up for good; past it
/// a missing id is refused at once (dead-lettered, replayable).
pub const UNKNOWN_IDS_RECHECKED: usize = 2;

/// Why the registry gave no schema for an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absence {
    /// 404: the id is not registered.
    NotRegistered,
    /// 403: the id is registered under a subject this service may not read (rights per
    /// subject). A record of it would hold up its partition for good if taken as the
    /// registry's passing state; rights granted later are found after
    /// [`UNKNOWN_ID_FORGET`].
    Forbidden,
}

/// What to do with a schema id the registry said it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Not known to be missing: ask the registry.
    Ask,
    /// Missing since a moment ago: ask again shortly (transient).
    Recheck,
    /// Missing for a while: dead-letter without asking.
    Missing,
}

/// Schema ids found missing, and since when. A bounded negative cache: an id is
/// rechecked for [`UNKNOWN_ID_RECHECK`] (at most [`UNKNOWN_IDS_RECHECKED`] ids per
/// [`UNKNOWN_ID_FORGET`]); once the registry has said "missing" after that window too,
/// the id is refused without a registry call until [`UNKNOWN_ID_FORGET`] has passed.
#[derive(Debug, Default)]
pub struct UnknownIds {
    /// Found missing since, and whether the id has had its recheck window: such an id,
    /// asked for again after [`UNKNOWN_ID_FORGET`], is refused without another wait.
    since: HashMap<u32, (Instant, bool, Absence)>,
    /// When each recheck window of the last [`UNKNOWN_ID_FORGET`] began.
    windows: std::collections::VecDeque<Instant>,
}

impl UnknownIds {
    /// Before asking the registry about `id`.
    pub fn before(&mut self, id: u32, now: Instant) -> Unknown {
        match self.since.get(&id) {
            Some(&(t, true, _)) if now.duration_since(t) < UNKNOWN_ID_FORGET => Unknown::Missing,
            _ => Unknown::Ask,
        }
    }

    /// Why `id` was last found missing.
    pub fn absence(&self, id: u32) -> Absence {
        self.since
            .get(&id)
            .map_or(Absence::NotRegistered, |&(_, _, why)| why)
    }

    /// The registry gave no schema for `id`, for `why`.
    pub fn missing(&mut self, id: u32, why: Absence, now: Instant) -> Unknown {
        // Bounded: a flood of random ids cannot grow this without end. Emptied when
        // half or more is recent, so the scan comes once per 5,000 ids at least, not
        // per id; a forgotten id costs one more registry call (`windows` still bounds
        // rechecks).
        if self.since.len() >= 10_000 {
            self.since
                .retain(|_, (t, _, _)| now.duration_since(*t) < UNKNOWN_ID_FORGET);
            if self.since.len() >= 5_000 {
                self.since.clear();
            }
        }
        match self.since.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (t, waited, absence) = e.get_mut();
                *absence = why;
                if *waited {
                    // Asked again a minute on: it had its wait, so it is refused at once.
                    *t = now;
                    Unknown::Missing
                } else if now.duration_since(*t) < UNKNOWN_ID_RECHECK {
                    Unknown::Recheck
                } else {
                    *waited = true;
                    Unknown::Missing
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                while self
                    .windows
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= UNKNOWN_ID_FORGET)
                {
                    self.windows.pop_front();
                }
                if self.windows.len() >= UNKNOWN_IDS_RECHECKED {
                    e.insert((now, true, why));
                    return Unknown::Missing;
                }
                self.windows.push_back(now);
                e.insert((now, false, why));
                Unknown::Recheck
            }
        }
    }

    pub fn found(&mut self, id: u32) {
        self.since.remove(&id);
    }
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

/// The largest single allocation apache-avro may make for one decoded value (a string,
/// bytes, a block of items). Far above any record Kafka delivers to us, far below the
/// library's 512 MiB default, so a forged length cannot take the memory of a service.
pub const MAX_AVRO_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// Sets [`MAX_AVRO_ALLOCATION_BYTES`] before anything is decoded (the first call wins,
/// process-wide).
pub fn limit_allocations() {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION_BYTES);
}

impl AvroCodec {
    pub fn new(cfg: &RegistryConfig) -> Result<Self, EncodeError> {
        limit_allocations();
        let settings = sr_settings(cfg).map_err(|e| EncodeError {
            retriable: false,
            message: format!("schema registry client: {e}"),
        })?;
        Ok(Self {
            registry: Arc::new(settings.clone()),
            registering: Arc::default(),
            decoder: Arc::new(RwLock::new(Arc::new(AvroDecoder::new(settings)))),
            unknown: Arc::default(),
            known: Arc::default(),
            max_writers: cfg.max_writer_schemas.max(1),
        })
    }

    fn decoder(&self) -> Arc<AvroDecoder> {
        self.decoder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many writer schemas, and how many bytes of their text, the decoder holds.
    pub fn writer_schemas(&self) -> WriterBudget {
        self.known().writers
    }

    fn known(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }

    fn learn(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `record` for `topic`, registering its schema under `<topic>-value` on
    /// first use.
    pub async fn encode<R: Record>(&self, topic: &str, record: &R) -> Result<Vec<u8>, EncodeError> {
        let id = match self.known_id::<R>(topic) {
            Some(id) => id,
            None => self.register::<R>(topic).await?,
        };
        let mut out = Vec::with_capacity(128);
        out.push(0);
        out.extend_from_slice(&id.to_be_bytes());
        record.write_avro(&mut out).map_err(|e| EncodeError {
            retriable: false,
            message: format!("encode {} for {topic}: {e}", R::NAME),
        })?;
        Ok(out)
    }

    /// The schema id `R` is written with under `topic`'s subject, once an
    /// [`AvroCodec::encode`] has registered or found it.
    pub fn known_id<R: Record>(&self, topic: &str) -> Option<u32> {
        self.known()
            .ids
            .get(topic)
            .and_then(|t| t.get(R::NAME))
            .copied()
    }

    /// Forgets the id `R` is written with under `topic` (a reply topic that refused a
    /// response); a later encode registers again, which the registry answers with the
    /// same id if the subject takes it.
    pub fn forget_id<R: Record>(&self, topic: &str) {
        let mut known = self.learn();
        if let Some(ids) = known.ids.get_mut(topic) {
            ids.remove(R::NAME);
            if ids.is_empty() {
                known.ids.remove(topic);
            }
        }
    }

    /// Forgets the ids of every topic `gone` says is gone (reply topics no longer on the
    /// broker), so topics that come and go do not pile up.
    pub fn forget_topics(&self, gone: impl Fn(&str) -> bool) {
        self.learn().ids.retain(|topic, _| !gone(topic));
    }

    /// Registers `R`'s schema under `topic`'s subject (the registry answers the existing
    /// id when it is there already) and keeps the id.
    async fn register<R: Record>(&self, topic: &str) -> Result<u32, EncodeError> {
        let mut failed = self.registering.lock().await;
        if let Some(id) = self.known_id::<R>(topic) {
            return Ok(id);
        }
        let key = (topic.to_string(), R::NAME);
        let now = Instant::now();
        if let Some((at, e)) = failed.get(&key)
            && now.saturating_duration_since(*at) < REGISTER_RETRY_AFTER
        {
            return Err(e.clone());
        }
        let schema = SuppliedSchema::new(
            Some(R::NAME.to_string()),
            SchemaType::Avro,
            R::SCHEMA_JSON.to_string(),
        );
        let registered = post_schema(&self.registry, format!("{topic}-value"), schema)
            .await
            .map_err(|e| EncodeError {
                // Refused credentials, rate limits and server errors are the registry's
                // state, not the schema's: wait for an operator, do not stop.
                retriable: e.retriable
                    || http_status(&e.error).is_some_and(|s| matches!(s, 401 | 403 | 429 | 500..)),
                message: format!("encode {} for {topic}: {}", R::NAME, describe(&e)),
            });
        let id = match registered {
            Ok(r) => {
                failed.remove(&key);
                r.id
            }
            Err(e) => {
                failed
                    .retain(|_, (at, _)| now.saturating_duration_since(*at) < REGISTER_RETRY_AFTER);
                failed.insert(key, (now, e.clone()));
                return Err(e);
            }
        };
        self.learn()
            .ids
            .entry(topic.to_string())
            .or_default()
            .insert(R::NAME, id);
        Ok(id)
    }

    /// Like [`AvroCodec::encode`], retrying with backoff while the registry is
    /// unreachable, until `stop` is cancelled. A refused schema is returned at once.
    pub async fn encode_retrying<R: Record>(
        &self,
        topic: &str,
        record: &R,
        stop: &CancellationToken,
    ) -> Result<Vec<u8>, EncodeError> {
        crate::retry::retrying("schema registry", stop, || self.encode(topic, record)).await
    }

    /// Decodes Confluent-framed bytes into `R`.
    /// A schema id the registry does not know is asked for again for a few seconds
    /// (transient) before the record is poison ([`UnknownIds`]).
    pub async fn decode<R: Record>(&self, bytes: &[u8]) -> Result<Decoded<R>, DecodeError> {
        let schema_id = check_framing(bytes)?;
        let own = self.known().own.get(&(schema_id, R::NAME)).copied();
        if own == Some(true) {
            return R::reader()
                .read_deser::<R>(&mut &bytes[5..])
                .map(|record| Decoded { record, schema_id })
                .map_err(|e| {
                    DecodeError::poison(
                        ErrorClass::DecodeError,
                        crate::dlq::reason(format_args!(
                            "schema id {schema_id} does not fit {}: {e}",
                            R::NAME
                        )),
                    )
                });
        }
        let unknown = |verdict: Unknown, why: Absence| match (verdict, why) {
            (Unknown::Recheck, Absence::NotRegistered) => DecodeError::Transient(format!(
                "schema id {schema_id} is not registered (yet); asking again"
            )),
            (Unknown::Recheck, Absence::Forbidden) => DecodeError::Transient(format!(
                "the registry refuses this service schema id {schema_id} (403); asking again"
            )),
            (_, Absence::NotRegistered) => DecodeError::poison(
                ErrorClass::UnknownSchemaId,
                format!("schema id {schema_id} is not registered"),
            ),
            (_, Absence::Forbidden) => DecodeError::poison(
                ErrorClass::UnknownSchemaId,
                format!(
                    "the registry refuses this service schema id {schema_id} (403 Forbidden): \
                     its subject is not one this service may read"
                ),
            ),
        };
        let missing = {
            let mut ids = self.unknown.lock().expect("unknown ids");
            (ids.before(schema_id, Instant::now()) == Unknown::Missing)
                .then(|| ids.absence(schema_id))
        };
        if let Some(why) = missing {
            return Err(unknown(Unknown::Missing, why));
        }
        self.refused_before(schema_id)?;
        let decoder = self.decoder();
        let writer = match decoder.get_schema(schema_id).await {
            Ok(w) => w,
            Err(e) => {
                let err = classify(&e);
                if matches!(
                    err,
                    DecodeError::Poison {
                        class: ErrorClass::UnknownSchemaId,
                        ..
                    }
                ) {
                    // The decoder caches the 404 or 403; drop it so the id can be asked
                    // again.
                    decoder.remove_errors_from_cache();
                    let why = match http_status(&e.error) {
                        Some(403) => Absence::Forbidden,
                        _ => Absence::NotRegistered,
                    };
                    let verdict = self.unknown.lock().expect("unknown ids").missing(
                        schema_id,
                        why,
                        Instant::now(),
                    );
                    return Err(unknown(verdict, why));
                }
                // The decoder caches non-retriable errors for good (their text can hold
                // the whole schema), and an HTTP 500 must not stick. One that will not
                // pass is kept here, counted.
                decoder.remove_errors_from_cache();
                if let DecodeError::Poison { message, .. } = &err {
                    self.keep_verdict(schema_id, message.len(), Some(NOT_FETCHED));
                }
                return Err(err);
            }
        };
        if own.is_none() {
            self.refuse_unreadable(schema_id, &writer)?;
        }
        let value = read_framed(schema_id, &writer.parsed, bytes)?;
        self.unknown.lock().expect("unknown ids").found(schema_id);
        // Avro schema resolution of the writer's schema to this reader's: fields it lacks
        // take their defaults, fields it adds are dropped, numbers are promoted.
        let record = value
            .resolve(R::schema())
            .and_then(|v| apache_avro::from_value::<R>(&v))
            .map_err(|e| {
                DecodeError::poison(
                    ErrorClass::DecodeError,
                    crate::dlq::reason(format_args!(
                        "schema id {schema_id} does not resolve to {}: {e}",
                        R::NAME
                    )),
                )
            })?;
        if own.is_none() {
            let same = writer.parsed.canonical_form() == R::schema().canonical_form();
            let mut known = self.learn();
            // Not if the cache started over meanwhile: the id is to be counted again.
            if known.unreadable.contains_key(&schema_id) {
                known.own.insert((schema_id, R::NAME), same);
            }
        }
        Ok(Decoded { record, schema_id })
    }

    /// Refuses writer schema `schema_id` (`writer`) when its data could take the process
    /// down ([`unreadable`]): apache-avro decodes by recursion and bounds each
    /// collection's allocation only on its own, so a recursive type nested as deep as its
    /// bytes allow overflows the stack, and arrays of items that read little or nothing
    /// allocate without end. No Lanes record is either. Judged once per id, when the
    /// id is new to the decoder: it is counted then ([`WriterBudget`]).
    fn refuse_unreadable(&self, schema_id: u32, writer: &AvroSchema) -> Result<(), DecodeError> {
        let known = self.known().unreadable.get(&schema_id).copied();
        let verdict = known.unwrap_or_else(|| {
            let verdict = unreadable(&writer.parsed);
            // What is parsed holds every schema the writer's references, each pasted in
            // where used: it can be far longer than the writer's own text.
            let bytes = match verdict {
                Some(_) => writer.raw.len(),
                None => writer.raw.len().max(writer.parsed.canonical_form().len()),
            };
            self.keep_verdict(schema_id, bytes, verdict);
            verdict
        });
        match verdict {
            Some(why) => Err(not_read(schema_id, why)),
            None => Ok(()),
        }
    }

    /// Refuses at once a writer schema id already judged unreadable or found not to be
    /// fetched for good, without asking the decoder.
    fn refused_before(&self, schema_id: u32) -> Result<(), DecodeError> {
        match self.known().unreadable.get(&schema_id) {
            Some(Some(why)) => Err(not_read(schema_id, why)),
            _ => Ok(()),
        }
    }

    /// Keeps `verdict` on writer schema id `schema_id`, new to the decoder, counting
    /// `bytes` for it ([`WriterBudget`]); past the budget the cache starts over first.
    fn keep_verdict(&self, schema_id: u32, bytes: usize, verdict: Option<&'static str>) {
        let emptied = {
            let mut known = self.learn();
            let emptied = (!known.writers.admit(bytes, self.max_writers))
                .then(|| self.start_over(&mut known));
            known.unreadable.insert(schema_id, verdict);
            emptied
        };
        // Dropped, with up to a cache of parsed schemas, outside the locks.
        if let Some(emptied) = emptied {
            drop(emptied);
            tracing::warn!(
                max_schemas = self.max_writers,
                max_bytes = MAX_WRITER_SCHEMA_BYTES,
                "writer schemas filled the cache; emptied it (each is fetched again when read)"
            );
        }
    }

    /// Empties the decoder's cache of writer schemas (a new decoder; one still reading
    /// keeps the old until it is done) and what is known of their ids, but for ids of
    /// our own schemas, which are read without the decoder. `known.writers` has been
    /// started over already. Returns the old decoder.
    fn start_over(&self, known: &mut Known) -> Arc<AvroDecoder> {
        let fresh = Arc::new(AvroDecoder::new((*self.registry).clone()));
        let emptied = std::mem::replace(
            &mut *self.decoder.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        known.unreadable.clear();
        known.own.retain(|_, same| *same);
        if known.own.len() > self.max_writers {
            known.own.clear();
        }
        emptied
    }

    /// Decodes Confluent-framed bytes of any registered schema into JSON (for tools).
    pub async fn decode_json(&self, bytes: &[u8]) -> Result<(serde_json::Value, u32), DecodeError> {
        let schema_id = check_framing(bytes)?;
        self.refused_before(schema_id)?;
        let decoder = self.decoder();
        let writer = decoder.get_schema(schema_id).await.map_err(|e| {
            decoder.remove_errors_from_cache();
            classify(&e)
        })?;
        self.refuse_unreadable(schema_id, &writer)?;
        let value = read_framed(schema_id, &writer.parsed, bytes)?;
        let json = serde_json::Value::try_from(value)
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
        crate::retry::retrying("schema registry", stop, || self.decode(bytes)).await
    }
}

/// The generic value of Confluent-framed `bytes` of writer schema `schema_id`
/// (`writer`), read only from the bytes there are; a record they do not hold is poison.
fn read_framed(
    schema_id: u32,
    writer: &apache_avro::Schema,
    bytes: &[u8],
) -> Result<apache_avro::types::Value, DecodeError> {
    read_datum(writer, &bytes[5..]).map_err(|e| {
        DecodeError::poison(
            ErrorClass::DecodeError,
            crate::dlq::reason(format_args!(
                "schema id {schema_id}: could not read its bytes: {e}"
            )),
        )
    })
}

/// The generic value of `bytes` written with `schema`, read only from the bytes there
/// are ([`Ends`]).
fn read_datum(
    schema: &apache_avro::Schema,
    bytes: &[u8],
) -> Result<apache_avro::types::Value, apache_avro::Error> {
    apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()?
        .read_value(&mut Ends(bytes))
}

/// A record's bytes, whose end is an error rather than an end of input: apache-avro reads
/// a union or a boolean met at the end of its input as null, without reading a byte,
/// so a forged count of such items would be decoded from nothing.
struct Ends<'a>(&'a [u8]);

impl std::io::Read for Ends<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the record ends before its schema does",
            ));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// Appends `record` to `out` in Confluent framing: magic byte, schema `id`, then the
/// Avro binary written with `R`'s schema. `T` is `R` or a view of it that serializes the
/// same fields in the same order (see [`crate::records::PredictionView`]), so a caller
/// that writes many records can borrow their strings and reuse one buffer.
pub fn write_framed<R: Record, T: serde::Serialize>(
    id: u32,
    record: &T,
    out: &mut Vec<u8>,
) -> Result<(), apache_avro::Error> {
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    R::writer().write_ser(out, record).map(drop)
}

/// Whether a named type of `schema` contains itself, directly or through others (a
/// linked list, a tree). Data of such a schema can nest as deep as its bytes go. Each
/// named type is walked once, so a schema that refers to one type many times is not
/// walked once per path.
fn is_recursive(schema: &apache_avro::Schema, names: &apache_avro::schema::NamesRef<'_>) -> bool {
    use apache_avro::schema::{Name, NamesRef, Schema};
    use std::collections::HashSet;
    // Names being walked (a cycle when met again) and names walked to the end.
    struct Walk<'s> {
        names: NamesRef<'s>,
        open: HashSet<Name>,
        done: HashSet<Name>,
    }
    impl Walk<'_> {
        fn cycles(&mut self, schema: &Schema, ns: Option<&str>) -> bool {
            match schema {
                Schema::Array(a) => self.cycles(&a.items, ns),
                Schema::Map(m) => self.cycles(&m.types, ns),
                Schema::Union(u) => u.variants().iter().any(|v| self.cycles(v, ns)),
                Schema::Record(r) => {
                    let name = r.name.fully_qualified_name(ns).into_owned();
                    if self.done.contains(&name) {
                        return false;
                    }
                    if !self.open.insert(name.clone()) {
                        return true;
                    }
                    let inner = name.namespace();
                    if r.fields.iter().any(|f| self.cycles(&f.schema, inner)) {
                        return true;
                    }
                    self.open.remove(&name);
                    self.done.insert(name);
                    false
                }
                Schema::Ref { name } => {
                    let name = name.fully_qualified_name(ns).into_owned();
                    if self.open.contains(&name) {
                        return true;
                    }
                    match self.names.get(&name).copied() {
                        Some(def) if !self.done.contains(&name) => {
                            self.cycles(def, name.namespace())
                        }
                        _ => false,
                    }
                }
                _ => false,
            }
        }
    }
    Walk {
        names: names.clone(),
        open: HashSet::new(),
        done: HashSet::new(),
    }
    .cycles(schema, None)
}

/// Why data of a writer `schema` is not decoded, if it is not: a type that contains
/// itself ([`is_recursive`]), or an array or map whose items can allocate far more
/// than the bytes they are read from ([`costly_items`]).
pub fn unreadable(schema: &apache_avro::Schema) -> Option<&'static str> {
    // A schema that does not resolve fails its decode anyway.
    let resolved = apache_avro::schema::ResolvedSchema::try_from(schema).ok()?;
    let names = resolved.get_names();
    if is_recursive(schema, names) {
        Some("is recursive (a type that contains itself)")
    } else {
        costly_items(schema, names)
    }
}

/// The most one item of an array or map may allocate, decoded, per byte it is read
/// from. A generic value costs about one `Value` per scalar (Lanes' own arrays of
/// strings, floats and longs come to a fifth of this); a field name or an enum symbol
/// is copied into every value that holds it. So a 1 MiB record may still make about
/// 256 MiB of short-lived values.
const MAX_ALLOC_PER_BYTE: i64 = 256;

/// Why an array or map of `schema` is refused, if one is. apache-avro bounds each
/// collection's allocation only on its own (16 MiB here), so items that read no bytes
/// (null, fixed of size 0, a record of only such), or that copy long names or many
/// fields per byte read, let a few kilobytes of nested forged counts ask for
/// gigabytes; and it zero-fills a fixed before reading it, so a fixed past that bound
/// is refused too. `schema` is not recursive; each named type is walked and costed
/// once.
fn costly_items(
    schema: &apache_avro::Schema,
    names: &apache_avro::schema::NamesRef<'_>,
) -> Option<&'static str> {
    use apache_avro::schema::{InnerDecimalSchema, Name, NamesRef, RecordField, Schema};
    use std::collections::{HashMap, HashSet};
    const VALUE: i64 = std::mem::size_of::<apache_avro::types::Value>() as i64;
    const STRING: i64 = std::mem::size_of::<String>() as i64;
    /// Of the values a type can decode to: the fewest bytes one is read from, and the
    /// most one allocates beyond [`MAX_ALLOC_PER_BYTE`] per byte read ("slack"). A
    /// record's slack is its fields' summed and a union's its worst branch's, so the
    /// worst value is found exactly; an item of positive slack is refused.
    #[derive(Clone, Copy)]
    struct Cost {
        min: u64,
        slack: i64,
    }
    fn reads(bytes: u64, alloc: i64) -> Cost {
        let per_byte = i64::try_from(bytes).unwrap_or(i64::MAX);
        Cost {
            min: bytes,
            slack: alloc.saturating_sub(MAX_ALLOC_PER_BYTE.saturating_mul(per_byte)),
        }
    }
    fn big(size: usize) -> Option<&'static str> {
        (size > MAX_AVRO_ALLOCATION_BYTES).then_some("has a fixed larger than 16 MiB")
    }
    struct Walk<'s> {
        names: NamesRef<'s>,
        walked: HashSet<Name>,
        records: HashMap<Name, Cost>,
    }
    impl Walk<'_> {
        fn check(&mut self, schema: &Schema, ns: Option<&str>) -> Option<&'static str> {
            match schema {
                Schema::Array(a) => self
                    .items(&a.items, ns, reads(0, 0))
                    .or_else(|| self.check(&a.items, ns)),
                // Each entry also reads its key (one byte at least) into a String.
                Schema::Map(m) => self
                    .items(&m.types, ns, reads(1, STRING))
                    .or_else(|| self.check(&m.types, ns)),
                Schema::Union(u) => u.variants().iter().find_map(|v| self.check(v, ns)),
                Schema::Record(r) => {
                    let name = r.name.fully_qualified_name(ns).into_owned();
                    if !self.walked.insert(name.clone()) {
                        return None;
                    }
                    let inner = name.namespace();
                    r.fields.iter().find_map(|f| self.check(&f.schema, inner))
                }
                Schema::Ref { name } => {
                    let name = name.fully_qualified_name(ns).into_owned();
                    match self.names.get(&name).copied() {
                        Some(def) if !self.walked.contains(&name) => {
                            self.check(def, name.namespace())
                        }
                        _ => None,
                    }
                }
                Schema::Fixed(f) | Schema::Duration(f) => big(f.size),
                Schema::Decimal(d) => match &d.inner {
                    InnerDecimalSchema::Fixed(f) => big(f.size),
                    InnerDecimalSchema::Bytes => None,
                },
                _ => None,
            }
        }

        fn items(&mut self, item: &Schema, ns: Option<&str>, key: Cost) -> Option<&'static str> {
            let cost = self.cost(item, ns);
            if cost.min.saturating_add(key.min) == 0 {
                Some("has an array whose items take no bytes")
            } else if cost.slack.saturating_add(key.slack) > 0 {
                Some(
                    "has an array or map whose items allocate over 256 bytes per byte read (long names or enum symbols, many fields)",
                )
            } else {
                None
            }
        }

        fn cost(&mut self, schema: &Schema, ns: Option<&str>) -> Cost {
            match schema {
                Schema::Null => reads(0, VALUE),
                Schema::Float => reads(4, VALUE),
                Schema::Double => reads(8, VALUE),
                Schema::Fixed(f) | Schema::Duration(f) => reads(f.size as u64, VALUE),
                Schema::Decimal(d) => match &d.inner {
                    InnerDecimalSchema::Fixed(f) => reads(f.size as u64, VALUE),
                    InnerDecimalSchema::Bytes => reads(1, VALUE),
                },
                Schema::Enum(e) => {
                    let longest = e.symbols.iter().map(String::len).max().unwrap_or(0);
                    reads(1, VALUE.saturating_add(longest as i64))
                }
                // Its index byte and box, and the worst branch.
                Schema::Union(u) => {
                    let index = reads(1, VALUE);
                    let mut worst: Option<Cost> = None;
                    for v in u.variants() {
                        let c = self.cost(v, ns);
                        worst = Some(match worst {
                            Some(w) => Cost {
                                min: w.min.min(c.min),
                                slack: w.slack.max(c.slack),
                            },
                            None => c,
                        });
                    }
                    worst.map_or(index, |c| Cost {
                        min: c.min.saturating_add(index.min),
                        slack: c.slack.saturating_add(index.slack),
                    })
                }
                Schema::Record(r) => {
                    let name = r.name.fully_qualified_name(ns).into_owned();
                    self.record(name, &r.fields)
                }
                Schema::Ref { name } => {
                    let name = name.fully_qualified_name(ns).into_owned();
                    match self.names.get(&name).copied() {
                        Some(Schema::Record(r)) => self.record(name, &r.fields),
                        Some(def) => self.cost(def, name.namespace()),
                        None => reads(1, VALUE),
                    }
                }
                // Every other value reads a byte at least (a count, a length, a
                // varint); its items, if any, are costed as a collection of their own.
                _ => reads(1, VALUE),
            }
        }

        /// A record: one value holding, per field, its name copied, a String and the
        /// field's value.
        fn record(&mut self, name: Name, fields: &[RecordField]) -> Cost {
            if let Some(&cost) = self.records.get(&name) {
                return cost;
            }
            let inner = name.namespace();
            let mut cost = reads(0, VALUE);
            for f in fields {
                let c = self.cost(&f.schema, inner);
                cost.min = cost.min.saturating_add(c.min);
                cost.slack = cost
                    .slack
                    .saturating_add(STRING.saturating_add(f.name.len() as i64))
                    .saturating_add(c.slack);
            }
            self.records.insert(name, cost);
            cost
        }
    }
    Walk {
        names: names.clone(),
        walked: HashSet::new(),
        records: HashMap::new(),
    }
    .check(schema, None)
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
            // The registry answered: this id does not exist, or it exists under a subject
            // this service may not read (rights per subject; a 401 would be our own
            // credentials). Either is the record's, rechecked a while ([`UnknownIds`]).
            404 | 403 => DecodeError::poison(ErrorClass::UnknownSchemaId, message),
            // Credentials, rate limits and server errors are the registry's problem, not
            // the record's.
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

    fn recursive(text: &str) -> bool {
        unreadable(&apache_avro::Schema::parse_str(text).expect("a valid schema"))
            .is_some_and(|why| why.contains("recursive"))
    }

    #[test]
    fn types_that_contain_themselves_are_recursive() {
        // A list, a tree through an array, a map of itself, two types through each
        // other, and a namespaced type named short inside itself.
        for text in [
            r#"{"type":"record","name":"N","fields":[{"name":"next","type":["null","N"]}]}"#,
            r#"{"type":"record","name":"T","fields":[{"name":"kids","type":{"type":"array","items":"T"}}]}"#,
            r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":"M"}}]}"#,
            r#"{"type":"record","name":"A","fields":[{"name":"b","type":{"type":"record","name":"B","fields":[{"name":"a","type":["null","A"]}]}}]}"#,
            r#"{"type":"record","name":"N","namespace":"x.y","fields":[{"name":"n","type":["null","N"]}]}"#,
        ] {
            assert!(recursive(text), "{text}");
        }
    }

    #[test]
    fn types_used_twice_and_lanes_records_are_not_recursive() {
        use crate::records::*;
        let twice = r#"{"type":"record","name":"R","fields":[
            {"name":"a","type":{"type":"record","name":"P","fields":[{"name":"x","type":"long"}]}},
            {"name":"b","type":"P"},{"name":"c","type":{"type":"array","items":"P"}}]}"#;
        assert!(!recursive(twice));
        for schema in [
            Event::schema(),
            MicroBatch::schema(),
            Prediction::schema(),
            PredictionRequest::schema(),
            PredictionResponse::schema(),
        ] {
            assert_eq!(unreadable(schema), None, "{}", schema.canonical_form());
        }
        // 40 types, each naming the next twice: walked once per type, not 2^40 times
        // (which would not end).
        let mut fields = vec![r#"{"name":"f40","type":{"type":"record","name":"L40","fields":[{"name":"x","type":"long"}]}}"#.to_string()];
        for i in (0..40).rev() {
            let next = i + 1;
            fields.push(format!(
                r#"{{"name":"f{i}","type":{{"type":"record","name":"L{i}","fields":[{{"name":"a","type":"L{next}"}},{{"name":"b","type":"L{next}"}}]}}}}"#
            ));
        }
        let text = format!(
            r#"{{"type":"record","name":"R","fields":[{}]}}"#,
            fields.join(",")
        );
        assert!(!recursive(&text));
    }

    #[test]
    fn arrays_of_items_that_read_little_and_allocate_much_are_unreadable() {
        let why = |text: &str| unreadable(&apache_avro::Schema::parse_str(text).expect(text));
        let nothing = Some("has an array whose items take no bytes");
        for text in [
            r#"{"type":"array","items":"null"}"#,
            r#"{"type":"record","name":"X","fields":[{"name":"a","type":{"type":"array","items":{"type":"array","items":"null"}}}]}"#,
            r#"{"type":"record","name":"X","fields":[{"name":"a","type":{"type":"array","items":{"type":"record","name":"E","fields":[]}}}]}"#,
            r#"{"type":"record","name":"X","fields":[{"name":"e","type":{"type":"record","name":"E","namespace":"n","fields":[{"name":"z","type":{"type":"fixed","name":"Z","size":0}}]}},{"name":"a","type":["null",{"type":"map","values":{"type":"array","items":"n.E"}}]}]}"#,
        ] {
            assert_eq!(why(text), nothing, "{text}");
        }
        // One byte read, a long symbol or name copied, or many values made.
        let symbol = "S".repeat(100_000);
        let name = "f".repeat(1_000);
        let nulls: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"name":"n{i}","type":"null"}}"#))
            .collect();
        for text in [
            format!(
                r#"{{"type":"array","items":{{"type":"enum","name":"E","symbols":["{symbol}"]}}}}"#
            ),
            format!(
                r#"{{"type":"array","items":{{"type":"record","name":"R","fields":[{{"name":"{name}","type":"int"}}]}}}}"#
            ),
            format!(
                r#"{{"type":"map","values":{{"type":"record","name":"R","fields":[{},{{"name":"i","type":"int"}}]}}}}"#,
                nulls.join(",")
            ),
            format!(
                r#"{{"type":"array","items":["null",{{"type":"enum","name":"E","symbols":["{symbol}"]}}]}}"#
            ),
            // The branch with the lower ratio but the larger allocation is the worse one
            // beside another field: 80 bytes read, 20 KB by the first branch, about
            // 100 x 600 by the second.
            format!(
                r#"{{"type":"array","items":{{"type":"record","name":"R","fields":[{{"name":"p","type":{{"type":"fixed","name":"P","size":80}}}},{{"name":"u","type":[{{"type":"enum","name":"E","symbols":["{}"]}},{{"type":"record","name":"B","fields":[{}]}}]}}]}}}}"#,
                "S".repeat(20_000),
                (0..100)
                    .map(|i| format!(r#"{{"name":"b{i}","type":{{"type":"enum","name":"E{i}","symbols":["{}"]}}}}"#, "T".repeat(500)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ] {
            assert!(
                why(&text).is_some_and(|w| w.contains("256 bytes per byte read")),
                "{}",
                &text[..text.len().min(200)]
            );
        }
        // Items of at least one byte that make about a value per byte: an array's own
        // count, a union's branch, a string's length, an enum's index, a map's key.
        for text in [
            r#"{"type":"array","items":{"type":"array","items":"long"}}"#,
            r#"{"type":"array","items":["null","long"]}"#,
            r#"{"type":"array","items":{"type":"record","name":"R","fields":[{"name":"n","type":"null"},{"name":"s","type":"string"}]}}"#,
            r#"{"type":"array","items":{"type":"enum","name":"One","symbols":["a"]}}"#,
            r#"{"type":"map","values":"null"}"#,
            r#"{"type":"array","items":["null",{"type":"record","name":"P","fields":[{"name":"entity_id","type":"string"},{"name":"score","type":"double"},{"name":"label","type":["null","string"]},{"name":"event_time","type":"long"}]}]}"#,
        ] {
            assert_eq!(why(text), None, "{text}");
        }
        assert!(
            why(r#"{"type":"record","name":"N","fields":[{"name":"next","type":["null","N"]}]}"#)
                .is_some_and(|w| w.contains("recursive"))
        );
        // Zero-filled before it is read.
        assert_eq!(
            why(
                r#"{"type":"record","name":"X","fields":[{"name":"f","type":{"type":"fixed","name":"F","size":1000000000}}]}"#
            ),
            Some("has a fixed larger than 16 MiB")
        );
        // 40 types, each naming the next twice, down to a record of nulls: each type is
        // costed once, not 2^40 times.
        let mut fields = vec![r#"{"name":"f40","type":{"type":"record","name":"L40","fields":[{"name":"x","type":"null"}]}}"#.to_string()];
        for i in (0..40).rev() {
            let next = i + 1;
            fields.push(format!(
                r#"{{"name":"f{i}","type":{{"type":"record","name":"L{i}","fields":[{{"name":"a","type":"L{next}"}},{{"name":"b","type":"L{next}"}}]}}}}"#
            ));
        }
        fields.push(r#"{"name":"all","type":{"type":"array","items":"L0"}}"#.to_string());
        let text = format!(
            r#"{{"type":"record","name":"R","fields":[{}]}}"#,
            fields.join(",")
        );
        assert_eq!(why(&text), nothing);
    }

    #[test]
    fn a_record_is_read_only_from_the_bytes_it_has() {
        // An array of 64-field records of ["null","int"]: a count of 1,000 then
        // nothing. At the end of its input apache-avro reads each union as null from no
        // bytes, so every item would be made from nothing.
        let fields: Vec<String> = (0..64)
            .map(|i| format!(r#"{{"name":"f{i}","type":["null","int"]}}"#))
            .collect();
        let text = format!(
            r#"{{"type":"array","items":{{"type":"record","name":"R","fields":[{}]}}}}"#,
            fields.join(",")
        );
        let schema = apache_avro::Schema::parse_str(&text).unwrap();
        // A block count: zigzag, then 7 bits a byte.
        let count = |n: u64| {
            let (mut z, mut out) = (n << 1, Vec::new());
            while z >= 0x80 {
                out.push((z as u8) | 0x80);
                z >>= 7;
            }
            out.push(z as u8);
            out
        };
        // Refused at the first union, not after making a thousand items (the next block
        // count fails either way).
        let read = format!("{:?}", read_datum(&schema, &count(1_000)).unwrap_err());
        assert!(read.contains("ends before its schema does"), "{read}");
        // Whole records read as before: one item of 64 nulls, then the end of the array.
        let mut whole = count(1);
        whole.extend(std::iter::repeat_n(0u8, 64));
        whole.push(0);
        let value = read_datum(&schema, &whole).unwrap();
        assert!(matches!(value, apache_avro::types::Value::Array(items) if items.len() == 1));
    }

    #[test]
    fn the_writer_cache_starts_over_past_its_count_or_its_bytes() {
        let mut b = WriterBudget::default();
        assert!(b.admit(100, 2));
        assert!(b.admit(100, 2));
        assert!(!b.admit(300, 2), "a third of two");
        assert_eq!(
            b,
            WriterBudget {
                schemas: 1,
                bytes: 300
            }
        );
        let mut b = WriterBudget::default();
        assert!(b.admit(MAX_WRITER_SCHEMA_BYTES - 10, 1000));
        assert!(b.admit(10, 1000));
        assert!(!b.admit(1, 1000), "a byte over");
        assert_eq!(
            b,
            WriterBudget {
                schemas: 1,
                bytes: 1
            }
        );
        let mut b = WriterBudget::default();
        assert!(
            b.admit(MAX_WRITER_SCHEMA_BYTES + 1, 1000),
            "alone, it is kept"
        );
        assert!(!b.admit(1, 1000));
    }

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

    /// A flood of random ids within a minute: the map never holds more than 10,000, and
    /// it is emptied once full rather than scanned again for every id.
    #[test]
    fn a_flood_of_missing_ids_is_bounded() {
        let mut ids = UnknownIds::default();
        let t0 = Instant::now();
        for id in 0..25_000 {
            ids.missing(id, Absence::NotRegistered, t0);
            assert!(ids.since.len() <= 10_000, "{} ids held", ids.since.len());
        }
        assert_eq!(ids.since.len(), 5_000, "emptied at 10,000 and 20,000");
        assert!(ids.windows.len() <= UNKNOWN_IDS_RECHECKED);
        assert_eq!(
            ids.missing(0, Absence::NotRegistered, t0),
            Unknown::Missing,
            "a forgotten id gets no second recheck window"
        );
    }

    #[test]
    fn missing_ids_are_rechecked_briefly_then_refused_until_forgotten() {
        let mut ids = UnknownIds::default();
        let t0 = Instant::now();
        assert_eq!(ids.before(7, t0), Unknown::Ask);
        assert_eq!(ids.missing(7, Absence::NotRegistered, t0), Unknown::Recheck);
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(ids.before(7, soon), Unknown::Ask, "still rechecking");
        assert_eq!(
            ids.missing(7, Absence::NotRegistered, soon),
            Unknown::Recheck
        );
        let later = t0 + UNKNOWN_ID_RECHECK;
        assert_eq!(
            ids.before(7, later),
            Unknown::Ask,
            "one last look past the window"
        );
        assert_eq!(
            ids.missing(7, Absence::NotRegistered, later),
            Unknown::Missing
        );
        assert_eq!(
            ids.before(7, later),
            Unknown::Missing,
            "then no registry call"
        );
        let much_later = t0 + UNKNOWN_ID_FORGET;
        assert_eq!(
            ids.before(7, much_later),
            Unknown::Ask,
            "the negative entry expired"
        );
        assert_eq!(
            ids.missing(7, Absence::NotRegistered, much_later),
            Unknown::Missing,
            "it had its wait"
        );
        assert_eq!(ids.before(7, much_later), Unknown::Missing);
        ids.found(7);
        assert_eq!(ids.before(7, much_later), Unknown::Ask);
        assert_eq!(
            ids.before(8, much_later),
            Unknown::Ask,
            "ids are independent"
        );
    }

    #[tokio::test]
    async fn a_subject_that_fails_to_register_is_asked_for_once_a_second_however_many_encode() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // A "registry" that takes each connection and closes it: every call fails.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        let codec = AvroCodec::new(&RegistryConfig {
            url,
            timeout_ms: 2000,
            basic_auth_user: None,
            basic_auth_password: None,
            max_writer_schemas: 1000,
        })
        .unwrap();
        let response = crate::records::PredictionResponse {
            request_id: "r".into(),
            entity_id: "e".into(),
            status: crate::records::ResponseStatus::Error,
            score: None,
            model_version: None,
            source: crate::records::ResponseSource::None,
            cache_age_ms: None,
            error: None,
            responded_at: 0,
        };
        let e = codec.encode("reply", &response).await.unwrap_err();
        assert!(e.retriable, "{e}");
        let first = calls.load(Ordering::SeqCst);
        assert!(first >= 1);
        for _ in 0..20 {
            assert_eq!(
                codec.encode("reply", &response).await.unwrap_err().message,
                e.message
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            first,
            "answered from the failure"
        );
        tokio::time::sleep(REGISTER_RETRY_AFTER).await;
        codec.encode("reply", &response).await.unwrap_err();
        assert!(
            calls.load(Ordering::SeqCst) > first,
            "asked again after a second"
        );
    }

    #[test]
    fn only_a_few_new_ids_a_minute_are_waited_for() {
        let mut ids = UnknownIds::default();
        let t0 = Instant::now();
        for id in 1..=UNKNOWN_IDS_RECHECKED as u32 {
            assert_eq!(
                ids.missing(id, Absence::NotRegistered, t0),
                Unknown::Recheck,
                "id {id}"
            );
        }
        let flood = UNKNOWN_IDS_RECHECKED as u32 + 1;
        let soon = t0 + Duration::from_secs(10);
        assert_eq!(
            ids.missing(flood, Absence::NotRegistered, soon),
            Unknown::Missing,
            "refused at once"
        );
        assert_eq!(
            ids.before(flood, soon),
            Unknown::Missing,
            "and not asked for"
        );
        assert_eq!(
            ids.missing(1, Absence::NotRegistered, t0 + Duration::from_secs(1)),
            Unknown::Recheck,
            "an id in its window keeps it"
        );
        // A minute on, ids that keep coming back take no window from a new one.
        let later = soon + UNKNOWN_ID_FORGET;
        for id in 1..=flood {
            assert_eq!(ids.before(id, later), Unknown::Ask, "id {id} asked again");
            assert_eq!(
                ids.missing(id, Absence::NotRegistered, later),
                Unknown::Missing,
                "id {id}"
            );
        }
        assert_eq!(
            ids.missing(flood + 1, Absence::NotRegistered, later),
            Unknown::Recheck,
            "a new id"
        );
        assert_eq!(ids.absence(flood + 1), Absence::NotRegistered);
        assert_eq!(
            ids.missing(flood + 1, Absence::Forbidden, later),
            Unknown::Recheck
        );
        assert_eq!(
            ids.absence(flood + 1),
            Absence::Forbidden,
            "the last answer"
        );
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
        let forbidden = SRCError::new(
            "HTTP request to schema registry failed with status 403 Forbidden",
            None,
            false,
        );
        assert!(matches!(
            classify(&forbidden),
            DecodeError::Poison {
                class: ErrorClass::UnknownSchemaId,
                ..
            }
        ));
        for passing in ["401 Unauthorized", "429 Too Many Requests"] {
            let e = SRCError::new(
                &format!("HTTP request to schema registry failed with status {passing}"),
                None,
                false,
            );
            assert!(classify(&e).is_transient(), "{passing}");
        }
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
