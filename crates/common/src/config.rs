//! Typed, layered configuration.
//!
//! Layers, later wins: `config/default.toml` compiled in -> an optional file
//! (`--config FILE` or `LANES_CONFIG`) -> environment variables `LANES__SECTION__KEY`.
//! Every struct rejects unknown keys, so a typo fails at start instead of being ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

/// The defaults every binary carries.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Environment prefix and separator: `LANES__KAFKA__BOOTSTRAP_SERVERS`.
pub const ENV_PREFIX: &str = "LANES";
/// Names a config file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "LANES_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Everything a Lanes process can be told. `Debug` prints the redacted form.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub redis: RedisConfig,
    pub topics: Topics,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub schema_registry: SchemaRegistryServerConfig,
    pub model: ModelConfig,
    pub ingest: IngestConfig,
    pub micro_batcher: MicroBatcherConfig,
    pub scorer: ScorerConfig,
    pub cache_writer: CacheWriterConfig,
    pub fallback_responder: FallbackResponderConfig,
    pub batch: BatchConfig,
    pub runner: RunnerConfig,
}

/// Limits of the stage runner every streaming service uses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// Inputs handled together at most (the cache-writer uses its `max_pipeline`).
    pub max_batch: usize,
    /// Inputs read and not yet acknowledged, at most; past it the source pauses its
    /// partitions (and keeps polling, so the member stays in its group).
    pub max_in_flight: usize,
    /// Their key, value and kept header bytes, at most.
    pub max_in_flight_bytes: usize,
    /// On each partition assignment, start this many records before the committed
    /// offset and skip them: a broker that answers a fetch from the next record batch
    /// (tansu 0.6) then still delivers the rest of the batch the commit fell inside.
    /// At least the largest record batch any producer writes; 0 turns it off.
    pub rewind_records: i64,
    /// How long a gap in a partition's offsets is fetched again before it is stepped
    /// over: tansu 0.6 can show a record batch before an earlier one is written, and a
    /// fetch then passes the earlier one by. 0 turns the check off (transaction markers
    /// and compaction leave gaps on Apache Kafka).
    pub gap_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Rows scored as one tensor by `lanes batch`.
    pub batch_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    Stale,
    Error,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackResponderConfig {
    pub group: String,
    pub freshness_ms: i64,
    pub refresh_after_ms: i64,
    /// Answer stale entries at once and refresh them in the background.
    pub stale_while_refresh: bool,
    pub realtime_deadline_ms: u64,
    pub on_deadline: OnDeadline,
    pub max_in_flight: usize,
    pub redis_timeout_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    /// How long the previous model version's entries stay servable after a switch.
    pub rollout_grace_ms: u64,
    pub sweep_interval_ms: u64,
    pub sweep_max_per_second: u64,
    pub sample_interval_ms: u64,
    pub sample_keys: usize,
    /// The hit ratio's sliding window, in seconds.
    pub hit_ratio_window_s: u64,
    /// The hit ratio under which the LanesCacheHitRatioLow alert fires, in [0, 1].
    pub hit_ratio_floor: f64,
    /// A `requested_at` more than this ahead of the responder's clock, or before 2000,
    /// is answered ERROR.
    pub max_clock_skew_ms: u64,
    /// Requests older than this (by `requested_at`) are answered ERROR `expired`
    /// instead of being scored after their caller gave up; 0 never expires them.
    pub max_request_age_ms: u64,
    /// Topics a request may name as `reply_topic`, besides `topics.responses`: exact
    /// names, or prefixes ending in `*`. Others get an ERROR on `topics.responses`.
    pub reply_topics: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A model folder (one subfolder per version) or one version's folder.
    pub dir: PathBuf,
    /// `latest` or a version folder's name.
    pub version: String,
    /// How often `dir` is checked for a new version; 0 only at start.
    pub watch_interval_ms: u64,
    /// A candidate version the scorer also scores with, to the shadow topic; "" none.
    #[serde(default)]
    pub shadow_version: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub group: String,
    pub max_event_bytes: usize,
    pub default_kind: String,
    /// Event times (and producers' Kafka timestamps) further ahead of ingest's clock
    /// than this, or before 2000-01-01, are dead-lettered as INVALID_EVENT_TIME.
    pub max_clock_skew_ms: u64,
    /// Whether the Avro loop runs: `Event`s from `topics.avro_events`.
    pub avro: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MicroBatcherConfig {
    pub group: String,
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_delay_ms: u64,
    #[serde(default)]
    pub priority_kinds: Vec<String>,
    /// Event-to-batch latency to hold: windows then adapt their delay and size within
    /// `max_delay_ms` and `max_events`.
    #[serde(default)]
    pub target_latency_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    pub group: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheWriterConfig {
    pub group: String,
    pub key_prefix: String,
    pub ttl_seconds: u64,
    pub max_pipeline: usize,
    pub online_features: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Partitions of topics Lanes creates when missing.
    pub partitions: i32,
    /// Replication factor of topics Lanes creates when missing.
    pub replication_factor: i32,
    /// Consumer group session timeout.
    pub session_timeout_ms: u64,
    /// librdkafka properties for every client; may hold secrets (`sasl.password`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for producers only.
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    /// Per service (`ingest`, `micro-batcher`, ...): properties over the two above, so
    /// each stage can trade latency for CPU on its own (linger, fetch wait).
    #[serde(default)]
    pub services: BTreeMap<String, ClientProperties>,
}

/// One service's own librdkafka properties.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientProperties {
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
}

/// Services whose clients `kafka.services` may tune.
pub const CLIENT_SERVICES: [&str; 6] = [
    "ingest",
    "micro-batcher",
    "scorer",
    "cache-writer",
    "fallback-responder",
    "batch",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub url: String,
    pub timeout_ms: u64,
    #[serde(default)]
    pub basic_auth_user: Option<String>,
    #[serde(default)]
    pub basic_auth_password: Option<Secret>,
    /// Writer schemas a service keeps, fetched by id; past this (or 2 MiB of their text)
    /// it empties its cache and fetches each again when read.
    #[serde(default = "default_max_writer_schemas")]
    pub max_writer_schemas: usize,
}

fn default_max_writer_schemas() -> usize {
    1000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS; an ACL user and
    /// password go in the URL and the password is redacted in logs.
    pub url: String,
    /// A PEM file of CA certificates to trust for `rediss://` instead of the system's.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    pub raw: String,
    /// `Event`s written by publishers that speak Avro (Confluent framing); ingest
    /// validates them like raw JSON and forwards them to `events`.
    pub avro_events: String,
    pub events: String,
    pub batches: String,
    pub predictions: String,
    pub requests: String,
    pub responses: String,
    pub dlq: String,
    /// Shadow-model predictions; never cached.
    pub shadow_predictions: String,
}

impl Topics {
    /// Every topic Lanes owns, for the topic admin.
    pub fn all(&self) -> [&str; 9] {
        [
            &self.raw,
            &self.avro_events,
            &self.events,
            &self.batches,
            &self.predictions,
            &self.requests,
            &self.responses,
            &self.dlq,
            &self.shadow_predictions,
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub host: String,
    pub ports: AdminPorts,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminPorts {
    pub up: u16,
    pub ingest: u16,
    pub micro_batcher: u16,
    pub scorer: u16,
    pub cache_writer: u16,
    pub fallback_responder: u16,
    /// `lanes batch --every`, while it waits between runs.
    pub batch: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    pub drain_timeout_ms: u64,
}

impl ShutdownConfig {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
}

/// A string that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

const REDACTED: &str = "***";

/// Room kept under `message.max.bytes` for the record's framing, key and headers.
pub const BATCH_HEADROOM: usize = 4096;

/// The smallest `message.max.bytes` a service producing predictions may have: one with a
/// 512-byte entity id, a 1,024-byte event id, 256-byte model strings and a 512-byte
/// batch id is about 3.5 KB with its key.
pub const MIN_PREDICTION_MESSAGE_BYTES: usize = 4096;

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl Settings {
    /// Defaults, then `file` (or the file named by `LANES_CONFIG`), then the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        Self::load_from(file.as_deref(), std::env::vars().collect())
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not touch
    /// the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            // Parse with `toml` first: config-rs would report a syntax error without the path.
            toml::from_str::<toml::Value>(&text).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.normalize();
        settings.validate()?;
        Ok(settings)
    }

    /// Environment variables cannot carry dots or dashes, so librdkafka keys arrive as
    /// `sasl_mechanism` and services as `micro_batcher`; librdkafka property names
    /// never contain underscores.
    fn normalize(&mut self) {
        // Merged, not replaced: the defaults spell a service `fallback-responder`, an
        // environment variable `fallback_responder` (which sorts after, so it wins).
        let mut services = BTreeMap::<String, ClientProperties>::new();
        for (k, v) in std::mem::take(&mut self.kafka.services) {
            let own = services.entry(k.replace('_', "-")).or_default();
            own.producer_properties.extend(v.producer_properties);
            own.consumer_properties.extend(v.consumer_properties);
        }
        self.kafka.services = services;
        let services = self
            .kafka
            .services
            .values_mut()
            .flat_map(|c| [&mut c.producer_properties, &mut c.consumer_properties]);
        for map in [
            &mut self.kafka.properties,
            &mut self.kafka.producer_properties,
            &mut self.kafka.consumer_properties,
        ]
        .into_iter()
        .chain(services)
        {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, v)| (k.replace('_', "."), v))
                .collect();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrap_servers must not be empty".into());
        }
        if self.kafka.partitions < 1 {
            return invalid(format!(
                "kafka.partitions must be >= 1, got {}",
                self.kafka.partitions
            ));
        }
        if self.kafka.replication_factor < 1 {
            return invalid(format!(
                "kafka.replication_factor must be >= 1, got {}",
                self.kafka.replication_factor
            ));
        }
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://"))
        {
            return invalid(format!(
                "registry.url must be http(s)://..., got {:?}",
                self.registry.url
            ));
        }
        if self.batch.batch_size == 0 {
            return invalid("batch.batch_size must be > 0".into());
        }
        if self.micro_batcher.max_events == 0 || self.micro_batcher.max_bytes == 0 {
            return invalid("micro_batcher.max_events and max_bytes must be > 0".into());
        }
        if let Some(unknown) = self
            .kafka
            .services
            .keys()
            .find(|k| !CLIENT_SERVICES.contains(&k.as_str()))
        {
            return invalid(format!(
                "kafka.services.{unknown}: no such service (one of {})",
                CLIENT_SERVICES.join(", ")
            ));
        }
        let r = &self.fallback_responder;
        if r.hit_ratio_window_s == 0 {
            return invalid("fallback_responder.hit_ratio_window_s must be > 0".into());
        }
        if !(0.0..=1.0).contains(&r.hit_ratio_floor) {
            return invalid(format!(
                "fallback_responder.hit_ratio_floor must be within 0 and 1, got {}",
                r.hit_ratio_floor
            ));
        }
        for pattern in &r.reply_topics {
            // A prefix is checked as a name (what a request adds to it, per request); a
            // bare "*" allows any topic.
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern != "*"
                && let Err(e) = crate::kafka::check_topic_name(name)
            {
                return invalid(format!(
                    "fallback_responder.reply_topics: {pattern:?} names no valid topic: {e}"
                ));
            }
        }
        let work = r.redis_timeout_ms.saturating_add(r.realtime_deadline_ms);
        if r.max_request_age_ms > 0 && work >= r.max_request_age_ms {
            return invalid(format!(
                "fallback_responder.max_request_age_ms ({}) must exceed redis_timeout_ms + realtime_deadline_ms ({work}): no request could start in time and every one would be answered expired",
                r.max_request_age_ms
            ));
        }
        if self.micro_batcher.target_latency_ms == Some(0) {
            return invalid("micro_batcher.target_latency_ms must be > 0 when set".into());
        }
        let limit = self
            .for_service("micro-batcher")
            .producer_message_max_bytes();
        if self.micro_batcher.max_bytes + BATCH_HEADROOM > limit {
            return invalid(format!(
                "micro_batcher.max_bytes ({}) plus {BATCH_HEADROOM} bytes of headroom exceeds the producer's message.max.bytes ({limit})",
                self.micro_batcher.max_bytes
            ));
        }
        // The services that produce predictions. A whole `lanes batch` run is checked
        // against this before anything is published.
        for service in ["scorer", "batch", "fallback-responder"] {
            let limit = self.for_service(service).producer_message_max_bytes();
            if limit < MIN_PREDICTION_MESSAGE_BYTES {
                return invalid(format!(
                    "{service}'s producer message.max.bytes ({limit}) is under {MIN_PREDICTION_MESSAGE_BYTES}: a prediction with the longest ids and model strings Lanes takes would not fit"
                ));
            }
        }
        if self.registry.max_writer_schemas == 0 {
            return invalid("registry.max_writer_schemas must be > 0".into());
        }
        let topics = self.topics.all();
        for (i, t) in topics.iter().enumerate() {
            if let Err(e) = crate::kafka::check_topic_name(t) {
                return invalid(format!("topic {t:?} is not a valid topic name: {e}"));
            }
            if topics[..i].contains(t) {
                return invalid(format!("topic {t:?} is configured for two purposes"));
            }
        }
        Ok(())
    }

    /// Gives this deployment its own topics, reply topics and cache prefix, all named
    /// after `id`, so it can share a broker and a Redis with others (tests, benchmarks).
    /// `lanes_services::namespace` also renames every service's consumer group.
    pub fn namespace(&mut self, id: &str) {
        let t = &mut self.topics;
        for (topic, suffix) in [
            (&mut t.raw, "raw"),
            (&mut t.avro_events, "events.avro"),
            (&mut t.events, "events"),
            (&mut t.batches, "batches"),
            (&mut t.predictions, "predictions"),
            (&mut t.requests, "requests"),
            (&mut t.responses, "responses"),
            (&mut t.dlq, "dlq"),
            (&mut t.shadow_predictions, "predictions.shadow"),
        ] {
            *topic = format!("{id}.{suffix}");
        }
        self.fallback_responder.reply_topics = vec![format!("{id}.responses.*")];
        self.cache_writer.key_prefix = format!("{id}:");
    }

    /// The producer's `message.max.bytes` (librdkafka's default unless configured).
    /// These settings as `service` uses them: its `kafka.services` properties applied
    /// over the shared producer and consumer properties.
    pub fn for_service(&self, service: &str) -> Settings {
        let mut s = self.clone();
        if let Some(own) = self.kafka.services.get(service) {
            s.kafka
                .producer_properties
                .extend(own.producer_properties.clone());
            s.kafka
                .consumer_properties
                .extend(own.consumer_properties.clone());
        }
        s
    }

    pub fn producer_message_max_bytes(&self) -> usize {
        self.kafka
            .producer_properties
            .get("message.max.bytes")
            .or_else(|| self.kafka.properties.get("message.max.bytes"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    }

    /// The settings as JSON with every secret replaced, fit for a log line.
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        redact(&mut value, None);
        value
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "private",
        "jaas",
    ]
    .iter()
    .any(|s| key.contains(s))
        || key.ends_with(".key.pem")
}

fn redact(value: &mut serde_json::Value, key: Option<&str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                redact(v, Some(k));
            }
        }
        serde_json::Value::String(s) => {
            if key.is_some_and(is_secret_key) {
                *s = REDACTED.to_string();
            } else {
                *s = redact_url_password(s);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| redact(v, key)),
        _ => {}
    }
}

/// `scheme://user:pass@host` -> `scheme://user:***@host`.
pub fn redact_url_password(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:{}{}",
            &s[..scheme_end + 3],
            &authority[..colon],
            REDACTED,
            &s[scheme_end + 3 + at..]
        ),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_service_may_tune_its_own_clients() {
        let vars: HashMap<String, String> = [
            (
                "LANES__KAFKA__SERVICES__MICRO_BATCHER__PRODUCER_PROPERTIES__LINGER_MS",
                "0",
            ),
            (
                "LANES__KAFKA__SERVICES__MICRO_BATCHER__CONSUMER_PROPERTIES__FETCH_WAIT_MAX_MS",
                "2",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings::load_from(None, vars).unwrap();
        let batcher = s.for_service("micro-batcher");
        assert_eq!(batcher.kafka.producer_properties["linger.ms"], "0");
        assert_eq!(batcher.kafka.consumer_properties["fetch.wait.max.ms"], "2");
        let ingest = s.for_service("ingest");
        assert_eq!(
            ingest.kafka.producer_properties["linger.ms"], s.kafka.producer_properties["linger.ms"],
            "other services keep the shared value"
        );
        // A file's entry for a service (spelled with a dash) survives a variable for
        // another of its properties (spelled with an underscore), and a variable for the
        // same property wins over it.
        let f = file(
            "[kafka.services.fallback-responder.producer_properties]\n\"linger.ms\" = \"7\"\n",
        );
        let responder = |pairs: &[(&str, &str)]| {
            Settings::load_from(Some(f.path()), env(pairs))
                .unwrap()
                .for_service("fallback-responder")
                .kafka
                .producer_properties
        };
        assert_eq!(responder(&[])["linger.ms"], "7");
        let p = responder(&[(
            "LANES__KAFKA__SERVICES__FALLBACK_RESPONDER__PRODUCER_PROPERTIES__BATCH_SIZE",
            "1000",
        )]);
        assert_eq!((&*p["linger.ms"], &*p["batch.size"]), ("7", "1000"));
        let p = responder(&[(
            "LANES__KAFKA__SERVICES__FALLBACK_RESPONDER__PRODUCER_PROPERTIES__LINGER_MS",
            "1",
        )]);
        assert_eq!(p["linger.ms"], "1");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("typo.toml");
        std::fs::write(
            &file,
            "[kafka.services.scorrer.producer_properties]\n\"linger.ms\" = \"0\"\n",
        )
        .unwrap();
        let e = Settings::load_from(Some(&file), HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("kafka.services.scorrer"), "{e}");
    }

    #[test]
    fn responder_settings_that_cannot_work_are_refused() {
        for (key, value, says) in [
            (
                "HIT_RATIO_FLOOR",
                "1.5",
                "hit_ratio_floor must be within 0 and 1",
            ),
            (
                "HIT_RATIO_FLOOR",
                "-0.1",
                "hit_ratio_floor must be within 0 and 1",
            ),
            ("HIT_RATIO_WINDOW_S", "0", "hit_ratio_window_s must be > 0"),
            (
                "REALTIME_DEADLINE_MS",
                "30000",
                "max_request_age_ms (30000) must exceed",
            ),
        ] {
            let e = Settings::load_from(
                None,
                env(&[(&format!("LANES__FALLBACK_RESPONDER__{key}"), value)]),
            )
            .unwrap_err();
            assert!(e.to_string().contains(says), "{key}={value}: {e}");
        }
        let s = Settings::load_from(
            None,
            env(&[("LANES__FALLBACK_RESPONDER__HIT_RATIO_FLOOR", "0.75")]),
        )
        .unwrap();
        assert_eq!(s.fallback_responder.hit_ratio_floor, 0.75);
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_from(None, HashMap::new()).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(s.registry.url, "http://127.0.0.1:8081");
        assert_eq!(s.topics.dlq, "lanes.dlq");
        assert_eq!(s.admin.ports.scorer, 9403);
        assert_eq!(s.log.format, LogFormat::Human);
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let f = file(
            "[kafka]\nbootstrap_servers = \"file:9092\"\npartitions = 6\n[log]\nformat = \"json\"\n",
        );
        let s = Settings::load_from(Some(f.path()), HashMap::new()).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "file:9092");
        assert_eq!(s.kafka.partitions, 6);
        assert_eq!(s.log.format, LogFormat::Json);
        // Untouched keys keep their defaults.
        assert_eq!(s.kafka.replication_factor, 1);

        let s = Settings::load_from(
            Some(f.path()),
            env(&[
                ("LANES__KAFKA__BOOTSTRAP_SERVERS", "env:9092"),
                ("LANES__ADMIN__PORTS__SCORER", "19403"),
                ("UNRELATED__KAFKA__X", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "env:9092");
        assert_eq!(
            s.kafka.partitions, 6,
            "file value survives where env is silent"
        );
        assert_eq!(s.admin.ports.scorer, 19403);
    }

    #[test]
    fn unknown_key_in_file_is_rejected_by_name() {
        let f = file("[kafka]\nbootstrap_server = \"typo:9092\"\n");
        let err = Settings::load_from(Some(f.path()), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootstrap_server"), "{err}");
    }

    #[test]
    fn unknown_section_and_env_key_are_rejected_by_name() {
        let f = file("[kafak]\nx = 1\n");
        let err = Settings::load_from(Some(f.path()), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafak"), "{err}");

        let err = Settings::load_from(None, env(&[("LANES__REDIS__URI", "redis://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("uri"), "{err}");
    }

    #[test]
    fn bad_value_and_bad_file_are_errors() {
        let err = Settings::load_from(None, env(&[("LANES__KAFKA__PARTITIONS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.partitions"), "{err}");
        let err = Settings::load_from(None, env(&[("LANES__KAFKA__PARTITIONS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("partitions"), "{err}");
        let f = file("[kafka\n");
        let err = Settings::load_from(Some(f.path()), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let err = Settings::load_from(Some(Path::new("/nonexistent/lanes.toml")), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/lanes.toml"), "{err}");
        // A service producing predictions whose messages could not hold one with the
        // longest ids Lanes takes: a batch run would stop halfway, published in part.
        let err = Settings::load_from(
            None,
            env(&[(
                "LANES__KAFKA__SERVICES__BATCH__PRODUCER_PROPERTIES__MESSAGE_MAX_BYTES",
                "4095",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("batch's producer message.max.bytes (4095)"),
            "{err}"
        );
        let err = Settings::load_from(None, env(&[("LANES__REGISTRY__MAX_WRITER_SCHEMAS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("registry.max_writer_schemas"), "{err}");
    }

    #[test]
    fn topics_and_reply_patterns_must_be_names_kafka_takes() {
        for (value, says) in [("", "0 characters"), ("lanes/predictions", "'/'")] {
            let err = Settings::load_from(None, env(&[("LANES__TOPICS__PREDICTIONS", value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{value:?}: {err}");
        }
        let f = file("[fallback_responder]\nreply_topics = [\"team-a.*\", \"a b.*\"]\n");
        let err = Settings::load_from(Some(f.path()), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("reply_topics: \"a b.*\""), "{err}");
        let f = file("[fallback_responder]\nreply_topics = [\"team-a.*\", \"b\", \"*\"]\n");
        let s = Settings::load_from(Some(f.path()), HashMap::new()).unwrap();
        assert_eq!(s.fallback_responder.reply_topics, ["team-a.*", "b", "*"]);
    }

    #[test]
    fn librdkafka_passthrough_from_file_and_env() {
        let f = file("[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n");
        let s = Settings::load_from(
            Some(f.path()),
            env(&[
                ("LANES__KAFKA__PROPERTIES__SASL_MECHANISM", "PLAIN"),
                ("LANES__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.kafka.properties["sasl.mechanism"], "PLAIN");
        assert_eq!(s.kafka.properties["sasl.password"], "hunter2");
        assert_eq!(s.kafka.producer_properties["linger.ms"], "5");
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Settings::load_from(
            None,
            env(&[
                ("LANES__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
                ("LANES__KAFKA__PROPERTIES__SASL_USERNAME", "alice"),
                ("LANES__REGISTRY__BASIC_AUTH_PASSWORD", "swordfish"),
                ("LANES__REDIS__URL", "redis://bob:opensesame@cache:6379/0"),
            ]),
        )
        .unwrap();
        let text = s.redacted().to_string();
        for secret in ["hunter2", "swordfish", "opensesame"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains("alice"), "non-secrets stay readable: {text}");
        assert!(text.contains("redis://bob:***@cache:6379/0"), "{text}");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("swordfish") && !debug.contains("hunter2"),
            "{debug}"
        );
        assert_eq!(
            s.registry.basic_auth_password.unwrap().expose(),
            "swordfish"
        );
    }

    #[test]
    fn a_namespace_renames_every_topic_and_the_prefix() {
        let mut s = Settings::load_from(None, HashMap::new()).unwrap();
        s.namespace("t1");
        assert!(s.topics.all().iter().all(|t| t.starts_with("t1.")));
        assert_eq!(s.topics.dlq, "t1.dlq");
        assert_eq!(
            s.fallback_responder.reply_topics,
            vec!["t1.responses.*".to_string()]
        );
        assert_eq!(s.cache_writer.key_prefix, "t1:");
        assert!(s.validate().is_ok(), "topics stay distinct");
    }

    #[test]
    fn url_redaction_leaves_plain_urls_alone() {
        assert_eq!(
            redact_url_password("http://127.0.0.1:8081"),
            "http://127.0.0.1:8081"
        );
        assert_eq!(redact_url_password("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url_password("not a url"), "not a url");
    }
}
