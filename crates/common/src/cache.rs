//! The cache contract, in one place: the cache-writer writes it, the responder, the CLI
//! and the tests read it.
//!
//! One Redis hash per entity, `<key_prefix><entity_id>`, holding the newest prediction
//! ([`prediction_fields`], written by [`WRITE_IF_NEWER`]) and the entity's latest online
//! features (`features`, `features_event_time`, written by [`FEATURES_IF_NEWER`]). Both
//! scripts run atomically in Redis, so replays and late results never roll an entry back.

use std::collections::{BTreeMap, HashMap};

use crate::config::RedisConfig;
use crate::dlq::ErrorClass;
use crate::error::Failure;
use crate::records::Prediction;

/// KEYS[1]: the entity's hash. ARGV: event_time, ttl_seconds, features JSON. Newest
/// event time wins; equal times keep what is there.
pub const FEATURES_IF_NEWER: &str = r"
local cached = redis.call('HGET', KEYS[1], 'features_event_time')
if cached and tonumber(ARGV[1]) <= tonumber(cached) then return 0 end
redis.call('HSET', KEYS[1], 'features_event_time', ARGV[1], 'features', ARGV[3])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
";

/// KEYS[1]: the entity's hash. ARGV: event_time, scored_at, ttl_seconds, event_id,
/// model_version, guard, then field/value pairs. Returns 1 when written, 0 when the
/// cached prediction is as new or newer, 2 when it is this very prediction (a
/// duplicate). With guard "1" (a prediction from a request's own features) it is also
/// refused when the entity's online features are newer than it: the entity has moved on.
/// `written_at` is Redis's own clock, so readers can measure event-to-cache latency.
pub const WRITE_IF_NEWER: &str = r"
local cached = redis.call('HMGET', KEYS[1], 'event_time', 'scored_at', 'event_id', 'model_version', 'features_event_time')
local t = tonumber(ARGV[1])
if cached[1] then
  if cached[3] == ARGV[4] and cached[4] == ARGV[5] then return 2 end
  local ct = tonumber(cached[1])
  if t < ct then return 0 end
  if t == ct and tonumber(ARGV[2]) <= tonumber(cached[2] or '0') then return 0 end
end
if ARGV[6] == '1' and cached[5] and tonumber(cached[5]) > t then return 0 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'written_at', now[1] * 1000 + math.floor(now[2] / 1000), unpack(ARGV, 7))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
";

/// A prediction header: present on predictions scored from a request's own features,
/// which [`WRITE_IF_NEWER`] then guards (see its `guard` argument).
pub const HEADER_GUARD: &str = "lanes.cache.guard";

/// What [`WRITE_IF_NEWER`] and [`FEATURES_IF_NEWER`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Written,
    Stale,
    Duplicate,
}

impl Written {
    pub fn from_reply(reply: i64) -> Self {
        match reply {
            1 => Written::Written,
            2 => Written::Duplicate,
            _ => Written::Stale,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Written::Written => "written",
            Written::Stale => "stale",
            Written::Duplicate => "duplicate",
        }
    }
}

/// A Redis client for `cfg`: plain, or TLS (`rediss://`) trusting `tls_ca_file` when
/// set. Every Lanes process connects through this.
pub fn client(cfg: &RedisConfig) -> redis::RedisResult<redis::Client> {
    match &cfg.tls_ca_file {
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "redis.tls_ca_file",
                    format!("{}: {e}", path.display()),
                ))
            })?;
            redis::Client::build_with_tls(
                cfg.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
        }
        None => redis::Client::open(cfg.url.as_str()),
    }
}

/// The Redis key of an entity's cache entry.
pub fn key(prefix: &str, entity_id: &str) -> String {
    format!("{prefix}{entity_id}")
}

/// The hash fields a prediction is stored as.
pub fn prediction_fields(p: &Prediction) -> Vec<(&'static str, String)> {
    vec![
        ("score", p.score.to_string()),
        ("label", p.label.clone().unwrap_or_default()),
        ("model_name", p.model_name.clone()),
        ("model_version", p.model_version.clone()),
        ("event_id", p.event_id.clone()),
        ("event_time", p.event_time.to_string()),
        ("scored_at", p.scored_at.to_string()),
        ("lane", p.lane.as_str().to_string()),
        (
            "ingested_at",
            p.ingested_at.map(|t| t.to_string()).unwrap_or_default(),
        ),
    ]
}

/// The [`WRITE_IF_NEWER`] call for `p`; `guard` for predictions from request features.
pub fn write_prediction<'a>(
    script: &'a redis::Script,
    prefix: &str,
    p: &Prediction,
    ttl_seconds: u64,
    guard: bool,
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.key(key(prefix, &p.entity_id));
    inv.arg(p.event_time)
        .arg(p.scored_at)
        .arg(ttl_seconds)
        .arg(&p.event_id)
        .arg(&p.model_version)
        .arg(if guard { "1" } else { "0" });
    for (k, v) in prediction_fields(p) {
        inv.arg(k).arg(v);
    }
    inv
}

/// The [`FEATURES_IF_NEWER`] call for an entity's features at `event_time`.
pub fn write_features<'a>(
    script: &'a redis::Script,
    prefix: &str,
    entity_id: &str,
    features: &BTreeMap<String, f64>,
    event_time: i64,
    ttl_seconds: u64,
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.key(key(prefix, entity_id));
    let json = serde_json::to_string(features).unwrap_or_default();
    inv.arg(event_time).arg(ttl_seconds).arg(json);
    inv
}

/// An entity's hash as the cache-writer keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cached {
    pub score: Option<f64>,
    pub model_version: Option<String>,
    pub event_time: Option<i64>,
    pub scored_at: Option<i64>,
    pub features: Option<BTreeMap<String, f64>>,
    pub features_event_time: Option<i64>,
}

impl Cached {
    /// `None` for an empty hash (no such key).
    pub fn from_hash(h: &HashMap<String, String>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        Some(Self {
            score: num("score").filter(|s| s.is_finite()),
            model_version: h.get("model_version").filter(|v| !v.is_empty()).cloned(),
            event_time: int("event_time"),
            scored_at: int("scored_at"),
            features: h.get("features").and_then(|f| serde_json::from_str(f).ok()),
            features_event_time: int("features_event_time"),
        })
    }

    /// Score and scoring time, when the entry holds a prediction.
    pub fn prediction(&self) -> Option<(f64, i64)> {
        Some((self.score?, self.scored_at?))
    }
}

/// Each key's entry in one pipeline, in the keys' order: `None` where the key is gone
/// (expired or deleted since a SCAN listed it), so no key is paired with another's hash.
pub async fn entries<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
) -> redis::RedisResult<Vec<Option<Cached>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("HGETALL").arg(k);
    }
    let hashes: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
    Ok(hashes.iter().map(Cached::from_hash).collect())
}

/// A Redis failure: the connection or the server's state (transient, retried), or this
/// one key or call (poison: WRONGTYPE, a script error).
pub fn classify(e: &redis::RedisError) -> Failure {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return Failure::transient(e.to_string());
    }
    // Server states that pass: loading, busy, failover, out of memory, a flushed script
    // cache, or credentials an operator is fixing.
    const PASSING: [&str; 11] = [
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "NOSCRIPT",
        "CLUSTERDOWN",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
    ];
    match e.code() {
        Some(code) if PASSING.contains(&code) => Failure::transient(e.to_string()),
        Some(_) => Failure::poison(ErrorClass::CacheWriteError, e.to_string()),
        None => Failure::transient(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse_with_and_without_a_prediction() {
        let h: HashMap<String, String> =
            [("features", r#"{"a":1.5}"#), ("features_event_time", "9")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let c = Cached::from_hash(&h).unwrap();
        assert_eq!(c.features.as_ref().unwrap()["a"], 1.5);
        assert_eq!(c.features_event_time, Some(9));
        assert_eq!(c.prediction(), None);
        assert!(Cached::from_hash(&HashMap::new()).is_none());
        let nan: HashMap<String, String> = [("score", "NaN"), ("scored_at", "5")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            Cached::from_hash(&nan).unwrap().prediction(),
            None,
            "a NaN score is no prediction"
        );
    }

    #[test]
    fn a_lost_connection_is_transient() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(classify(&io).is_transient());
    }
}
