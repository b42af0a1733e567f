//! The cache contract, in one place: the cache-writer writes it, the responder, the CLI
//! and the tests read it.
//!
//! One Redis hash per entity, `<key_prefix><entity_id>`, holding the newest prediction
//! (written by [`WRITE_IF_NEWER`]) and the entity's latest online features (`features`,
//! `features_event_time`, written by [`FEATURES_IF_NEWER`]). Both scripts run atomically
//! in Redis, so replays and late results never roll an entry back. Each call writes a
//! whole pipeline of entities, so all keys of a call must live on one Redis server (no
//! cluster sharding).

use std::collections::{BTreeMap, HashMap};

use crate::config::RedisConfig;
use crate::dlq::ErrorClass;
use crate::error::Failure;
use crate::records::Prediction;
use serde::Serialize;

/// KEYS: one entity hash per item. ARGV[1]: ttl_seconds, then per item its event_time
/// and features JSON. Newest event time wins; equal times keep what is there. Replies
/// one entry per key: 1 written, 0 stale, or the error Redis gave for that key alone.
/// One call per pipeline, not per item: the script call costs Redis more than the
/// commands inside it. Only a key's first read is a `pcall`: once it answered as a
/// hash, writing it can only fail for the whole server (out of memory), which fails
/// the call and retries it whole. A cached time that is not a number counts as none,
/// so the entry is rewritten rather than the call failing. An argument the writer
/// formatted as an integer is read with `+ 0`, one `strtod`; `tonumber` (two) is kept
/// for what the hash holds.
pub const FEATURES_IF_NEWER: &str = r"
local ttl = ARGV[1]
local expire = ttl ~= '0'
local out = {}
for i, key in ipairs(KEYS) do
  local cached = redis.pcall('HGET', key, 'features_event_time')
  if type(cached) == 'table' and cached.err then
    out[i] = cached.err
  else
    local ct = cached and tonumber(cached)
    if ct and ARGV[2 * i] + 0 <= ct then
      out[i] = 0
    else
      redis.call('HSET', key, 'features_event_time', ARGV[2 * i], 'features', ARGV[2 * i + 1])
      if expire then redis.call('EXPIRE', key, ttl) end
      out[i] = 1
    end
  end
end
return out
";

/// KEYS: one entity hash per item. ARGV[1]: ttl_seconds, then ten values per item: event_time,
/// scored_at, event_id, model_version, guard, score, label, model_name, lane,
/// ingested_at. Replies one entry per key: 1 when written, 0 when the cached prediction
/// is as new or newer, 2 when it is this very prediction (a duplicate), or the error
/// Redis gave for that key alone. With guard "1" (a prediction from a request's own
/// features) it is also refused when the entity's online features are newer than it: the
/// entity has moved on. `written_at` is Redis's own clock, so readers can measure
/// event-to-cache latency. Redis spends most of a call converting values between Lua
/// and commands and parsing numbers, so each item reads only what its branch needs:
/// `model_version` only when the cached `event_id` is this one's, `scored_at` only on
/// an event-time tie, `features_event_time` only when guarded. Arguments are read with
/// `+ 0` (one `strtod`; `tonumber` takes two), the ttl stays a string, and `written_at`
/// is formatted once per call.
pub const WRITE_IF_NEWER: &str = r"
local ttl = ARGV[1]
local expire = ttl ~= '0'
local now = redis.call('TIME')
local written_at = tostring(now[1] * 1000 + math.floor(now[2] / 1000))
local out = {}
for i, key in ipairs(KEYS) do
  local a = 1 + (i - 1) * 10
  local guard = ARGV[a + 5] == '1'
  local cached
  if guard then
    cached = redis.pcall('HMGET', key, 'event_time', 'event_id', 'features_event_time')
  else
    cached = redis.pcall('HMGET', key, 'event_time', 'event_id')
  end
  if cached.err then
    out[i] = cached.err
  else
    local t, ct = ARGV[a + 1] + 0, tonumber(cached[1])
    if ct and cached[2] == ARGV[a + 3] and redis.call('HGET', key, 'model_version') == ARGV[a + 4] then
      out[i] = 2
    elseif ct and (t < ct or (t == ct and ARGV[a + 2] + 0 <= (tonumber(redis.call('HGET', key, 'scored_at')) or 0))) then
      out[i] = 0
    elseif guard and (tonumber(cached[3]) or t) > t then
      out[i] = 0
    else
      redis.call('HSET', key, 'written_at', written_at, 'event_time', ARGV[a + 1],
        'scored_at', ARGV[a + 2], 'event_id', ARGV[a + 3], 'model_version', ARGV[a + 4],
        'score', ARGV[a + 6], 'label', ARGV[a + 7], 'model_name', ARGV[a + 8],
        'lane', ARGV[a + 9], 'ingested_at', ARGV[a + 10])
      if expire then redis.call('EXPIRE', key, ttl) end
      out[i] = 1
    end
  end
end
return out
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
    /// Every answer, in declaration order (`as usize` indexes it).
    pub const ALL: [Written; 3] = [Written::Written, Written::Stale, Written::Duplicate];

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

/// One call of a cache script. Keys and arguments go straight into one command
/// buffer: redis' `ScriptInvocation` allocates per argument and copies them all again
/// per call, about a dozen allocations per cached prediction.
pub struct ScriptCall<'a> {
    script: &'a redis::Script,
    cmd: redis::Cmd,
}

impl ScriptCall<'_> {
    /// Runs the call by the script's hash, loading the script first if Redis lost it
    /// (a restart, `SCRIPT FLUSH`), as `ScriptInvocation` does.
    pub async fn invoke<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> redis::RedisResult<redis::Value> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            reply => reply,
        }
    }
}

/// The most argument space a script call reserves from its first item's sizes.
const MAX_RESERVED_ARGS: usize = 4 << 20;

/// The longest model name, version or label a model may have and a cache entry may
/// hold: the version is copied into every answer served from an entry, so a prediction
/// written straight to the topic with a megabyte of it would turn each small request
/// into a megabyte response.
pub const MAX_MODEL_FIELD_BYTES: usize = 256;

/// Why the first of `fields` (name, value) longer than [`MAX_MODEL_FIELD_BYTES`] is
/// refused, if one is: a model's spec and each prediction the cache-writer takes.
pub fn overlong<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<String> {
    crate::records::over_limit(
        fields
            .into_iter()
            .map(|(field, value)| (field, value, MAX_MODEL_FIELD_BYTES)),
    )
}

/// What to reserve for `rest` items sized like the first (`sizes`): nothing past
/// [`MAX_RESERVED_ARGS`], so a first item of outsized ids (a hostile record) does not
/// reserve its size for every item; the buffer then grows as it fills.
fn reserved_args(sizes: &[usize], rest: usize) -> impl Iterator<Item = usize> + '_ {
    let per_item = sizes.iter().fold(0usize, |sum, s| sum.saturating_add(*s));
    let within = per_item.saturating_mul(rest) <= MAX_RESERVED_ARGS;
    let n = if within { sizes.len() * rest } else { 0 };
    sizes.iter().copied().cycle().take(n)
}

/// `EVALSHA hash n key1..keyn ttl args(item1).. args(itemn)`: one key per item.
fn script_call<'a, T>(
    script: &'a redis::Script,
    prefix: &str,
    ttl_seconds: u64,
    items: impl IntoIterator<Item = T>,
    entity_id: impl Fn(&T) -> &str,
    mut args: impl FnMut(&mut redis::Cmd, &T),
) -> ScriptCall<'a> {
    use redis::RedisWrite;
    // Keys come before all arguments: two passes.
    let items: Vec<T> = items.into_iter().collect();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(items.len());
    // The buffer is sized from the keys and the first item's arguments: grown by
    // doubling instead, a pipeline of hundreds of items is copied over several times.
    let Some((first, rest)) = items.split_first() else {
        cmd.arg(ttl_seconds);
        return ScriptCall { script, cmd };
    };
    cmd.reserve_space_for_args(items.iter().map(|i| prefix.len() + entity_id(i).len()));
    for item in &items {
        // The same text as [`key`], written in place.
        cmd.write_arg_fmt(format_args!("{prefix}{}", entity_id(item)));
    }
    cmd.arg(ttl_seconds);
    let before = cmd.args_iter().len();
    args(&mut cmd, first);
    let sizes: Vec<usize> = cmd
        .args_iter()
        .skip(before)
        .map(|a| match a {
            redis::Arg::Simple(bytes) => bytes.len(),
            _ => 0,
        })
        .collect();
    cmd.reserve_space_for_args(reserved_args(&sizes, rest.len()));
    for item in rest {
        args(&mut cmd, item);
    }
    ScriptCall { script, cmd }
}

/// The [`WRITE_IF_NEWER`] call for `items`, each a prediction and whether it is guarded
/// (scored from a request's own features).
pub fn write_predictions<'a, 'p>(
    script: &'a redis::Script,
    prefix: &str,
    items: impl IntoIterator<Item = (&'p Prediction, bool)>,
    ttl_seconds: u64,
) -> ScriptCall<'a> {
    use redis::RedisWrite;
    script_call(
        script,
        prefix,
        ttl_seconds,
        items,
        |(p, _)| &p.entity_id,
        |cmd, &(p, guard)| {
            cmd.arg(p.event_time)
                .arg(p.scored_at)
                .arg(&p.event_id)
                .arg(&p.model_version)
                .arg(if guard { "1" } else { "0" });
            // `Display`, as the scripts and readers of the hash expect (`NaN` included).
            cmd.write_arg_fmt(p.score);
            cmd.arg(p.label.as_deref().unwrap_or_default())
                .arg(&p.model_name)
                .arg(p.lane.as_str());
            match p.ingested_at {
                Some(t) => cmd.arg(t),
                None => cmd.arg(""),
            };
        },
    )
}

/// The [`FEATURES_IF_NEWER`] call for `items`: entity id, features, event time.
pub fn write_features<'a, 'e, F: Serialize + 'e>(
    script: &'a redis::Script,
    prefix: &str,
    items: impl IntoIterator<Item = (&'e str, &'e F, i64)>,
    ttl_seconds: u64,
) -> ScriptCall<'a> {
    // Each map is written to one scratch buffer, then copied as one argument: serde_json
    // writing straight into the command's writer made a call per key, quote and number.
    let mut json = Vec::with_capacity(256);
    script_call(
        script,
        prefix,
        ttl_seconds,
        items,
        |(entity_id, _, _)| entity_id,
        |cmd, (_, features, event_time)| {
            cmd.arg(*event_time);
            json.clear();
            // Features (a map of strings to floats) cannot fail to serialise.
            let _ = serde_json::to_writer(&mut json, features);
            cmd.arg(&json[..]);
        },
    )
}

/// For each item of a [`FEATURES_IF_NEWER`] call (entity id, event time, in the call's
/// order), the index of the one item of its entity that can be left in the entry: the
/// first with the entity's newest event time (equal times keep what is there). The
/// script runs atomically, so no reader sees an entry between two items of a call, and
/// sending only these items leaves Redis as sending all would, touching a busy entity
/// once per call instead of once per event. [`WRITE_IF_NEWER`] has no such rule (a
/// duplicate's refusal depends on which item is cached), so predictions go whole.
pub fn newest_per_entity(items: &[(&str, i64)]) -> Vec<usize> {
    // One hash per item: each entity gets a number, whose newest item is kept by index.
    let mut entities: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut newest: Vec<usize> = Vec::new();
    let mut entity_of = Vec::with_capacity(items.len());
    for (i, &(entity, time)) in items.iter().enumerate() {
        let e = *entities.entry(entity).or_insert_with(|| {
            newest.push(i);
            newest.len() - 1
        });
        if time > items[newest[e]].1 {
            newest[e] = i;
        }
        entity_of.push(e);
    }
    entity_of.into_iter().map(|e| newest[e]).collect()
}

/// Each key's reply of a [`WRITE_IF_NEWER`] or [`FEATURES_IF_NEWER`] call, in the
/// keys' order: what was done, or the failure Redis gave for that key.
pub fn replies(reply: redis::Value, keys: usize) -> Result<Vec<Result<Written, Failure>>, Failure> {
    let redis::Value::Array(items) = reply else {
        return Err(Failure::fatal(format!("cache script replied {reply:?}")));
    };
    if items.len() != keys {
        return Err(Failure::fatal(format!(
            "cache script replied {} entries for {keys} keys",
            items.len()
        )));
    }
    Ok(items
        .into_iter()
        .map(|v| match v {
            redis::Value::Int(n) => Ok(Written::from_reply(n)),
            redis::Value::BulkString(b) => Err(classify_code(&String::from_utf8_lossy(&b))),
            redis::Value::SimpleString(s) => Err(classify_code(&s)),
            other => Err(Failure::poison(
                ErrorClass::CacheWriteError,
                format!("unexpected reply {other:?}"),
            )),
        })
        .collect())
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
            // Copied into every answer from this entry: one written before the
            // cache-writer bounded it must not make each small request a large response.
            // Cut, it is still longer than any serving version (a character is at
            // most 4 bytes), so the entry is stale.
            model_version: h
                .get("model_version")
                .filter(|v| !v.is_empty())
                .map(|v| crate::dlq::truncate_str(v, MAX_MODEL_FIELD_BYTES + 4).to_string()),
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

    /// Why the prediction is not fresh at `now` (epoch ms) for a reader allowing
    /// `max_age_ms` and serving `serving`; `None` when it is fresh or there is none.
    /// Scored by another version beats online features newer than the scored event
    /// (the entity moved on since), which beats age.
    pub fn staleness(&self, max_age_ms: i64, serving: Option<&str>, now: i64) -> Option<Staleness> {
        let scored_at = self.scored_at?;
        if let (Some(serving), Some(scored_by)) = (serving, &self.model_version)
            && serving != scored_by
        {
            return Some(Staleness::ModelVersion);
        }
        if let (Some(features), Some(scored)) = (self.features_event_time, self.event_time)
            && features > scored
        {
            return Some(Staleness::Features);
        }
        // Aged both ways: an entry scored further ahead than the bound (a writer whose
        // clock ran ahead, or one that is not Lanes) would otherwise stay fresh forever.
        let age = now.saturating_sub(scored_at);
        (age > max_age_ms || age < max_age_ms.saturating_neg()).then_some(Staleness::Age)
    }
}

/// Why a cached prediction is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Older than the freshness bound.
    Age,
    /// Scored by another model version than the one serving.
    ModelVersion,
    /// The entity's online features are newer than the event its score came from.
    Features,
}

impl Staleness {
    /// The metric label: `stale_age`, `stale_version`, `stale_features`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Age => "stale_age",
            Self::ModelVersion => "stale_version",
            Self::Features => "stale_features",
        }
    }
}

/// One SCAN step over the entries under `prefix`: the keys it listed (a key may come
/// twice across steps) and the next cursor, 0 when the walk is done. A key name that is
/// not UTF-8 (another client's; Lanes writes none) is left out: read as a string it
/// failed the whole step, and a walk retrying that step never got past it.
pub async fn scan<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    cursor: u64,
    count: usize,
) -> redis::RedisResult<(u64, Vec<String>)> {
    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(format!("{prefix}*"))
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok((
        next,
        keys.into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .collect(),
    ))
}

/// The fields of an entry that [`Cached`] reads. Readers ask for these by `HMGET`, not
/// for the whole hash: the rest (`event_id` above all, any length a writer chose) is
/// never read back, so a request or a sweep page costs what a reader uses.
const READ_FIELDS: [&str; 6] = [
    "score",
    "model_version",
    "event_time",
    "scored_at",
    "features",
    "features_event_time",
];

/// The `HMGET` of [`READ_FIELDS`] for `key`.
fn read_cmd(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(key).arg(&READ_FIELDS[..]);
    cmd
}

/// An entry from the values of [`READ_FIELDS`], in order; `None` when it has none of
/// them (the key is gone). A value that is not UTF-8 (another client's; Lanes writes
/// none) reads as absent.
fn from_fields(values: Vec<Option<Vec<u8>>>) -> Option<Cached> {
    let h: HashMap<String, String> = READ_FIELDS
        .iter()
        .zip(values)
        .filter_map(|(k, v)| Some((k.to_string(), String::from_utf8(v?).ok()?)))
        .collect();
    Cached::from_hash(&h)
}

/// The entry under `key`, in one round trip.
pub async fn read<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<Option<Cached>> {
    let values: Vec<Option<Vec<u8>>> = read_cmd(key).query_async(conn).await?;
    Ok(from_fields(values))
}

/// Each key's entry in one pipeline, in the keys' order: `None` where the key is gone
/// (expired or deleted since a SCAN listed it), so no key is paired with another's hash,
/// and where the server refuses the read of that key alone (WRONGTYPE: another client's
/// key under the prefix), so one such key does not fail its page.
pub async fn entries<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
) -> redis::RedisResult<Vec<Option<Cached>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in keys {
        pipe.add_command(read_cmd(k));
    }
    let values: Vec<redis::RedisResult<Vec<Option<Vec<u8>>>>> = pipe.query_async(conn).await?;
    values
        .into_iter()
        .map(|v| match v {
            Ok(values) => Ok(from_fields(values)),
            Err(e) if classify(&e).is_transient() => Err(e),
            Err(_) => Ok(None),
        })
        .collect()
}

/// A Redis failure: the connection or the server's state (transient, retried), or this
/// one key or call (poison: WRONGTYPE, a script error).
pub fn classify(e: &redis::RedisError) -> Failure {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return Failure::transient(e.to_string());
    }
    match e.code() {
        Some(code) if passing(code, &e.to_string()) => Failure::transient(e.to_string()),
        Some(_) => Failure::poison(ErrorClass::CacheWriteError, e.to_string()),
        None => Failure::transient(e.to_string()),
    }
}

/// Server states that pass: loading, busy, failover, out of memory, a flushed script
/// cache, writes refused while a primary has too few replicas (`min-replicas-to-write`)
/// or cannot save (`stop-writes-on-bgsave-error`), or credentials an operator is fixing.
/// Any of them taken for good would dead-letter every write while it lasts.
const PASSING: [&str; 13] = [
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "MASTERDOWN",
    "READONLY",
    "OOM",
    "NOSCRIPT",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
];

/// Whether a server error of `code` (its text `message`) is a passing state: one of
/// [`PASSING`], or a server at its `maxclients`, which says so under the generic `ERR`.
fn passing(code: &str, message: &str) -> bool {
    PASSING.contains(&code) || (code == "ERR" && message.contains("max number of clients"))
}

/// [`classify`] for an error a script returned as text (`CODE message`).
fn classify_code(message: &str) -> Failure {
    let code = message.split_whitespace().next().unwrap_or_default();
    if passing(code, message) {
        Failure::transient(message.to_string())
    } else {
        Failure::poison(ErrorClass::CacheWriteError, message.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Features;

    #[test]
    fn each_entity_keeps_its_first_newest_item() {
        let items = [
            ("a", 5),
            ("b", 1),
            ("a", 7),
            ("c", 3),
            ("a", 7),
            ("b", 0),
            ("a", 6),
        ];
        assert_eq!(newest_per_entity(&items), [2, 1, 2, 3, 2, 1, 2]);
        assert_eq!(newest_per_entity(&[("a", 1), ("b", 1)]), [0, 1]);
        assert!(newest_per_entity(&[]).is_empty());
    }

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
        let long = "v".repeat(500_000);
        let version = |v: &str| {
            let h: HashMap<String, String> = [("score", "0.5"), ("scored_at", "5")]
                .into_iter()
                .chain([("model_version", v)])
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Cached::from_hash(&h).unwrap()
        };
        let cut = version(&long);
        assert_eq!(
            cut.model_version.as_deref().map(str::len),
            Some(MAX_MODEL_FIELD_BYTES + 4),
            "a version no answer carries whole"
        );
        let wide = version(&"é".repeat(1000));
        assert!(
            wide.model_version.unwrap().len() > MAX_MODEL_FIELD_BYTES,
            "cut on a character boundary, still longer than any serving version"
        );
        let serving = &long[..MAX_MODEL_FIELD_BYTES];
        assert_eq!(
            cut.staleness(60_000, Some(serving), 10),
            Some(Staleness::ModelVersion),
            "and no serving version is"
        );
        assert_eq!(version("7").model_version.as_deref(), Some("7"));
    }

    #[test]
    fn staleness_by_version_then_features_then_age() {
        let c = Cached {
            score: Some(0.5),
            model_version: Some("2".into()),
            event_time: Some(900),
            scored_at: Some(1_000),
            features: None,
            features_event_time: Some(900),
        };
        assert_eq!(c.staleness(500, Some("2"), 1_400), None);
        assert_eq!(c.staleness(500, None, 1_400), None, "no version to compare");
        assert_eq!(c.staleness(500, Some("2"), 1_501), Some(Staleness::Age));
        assert_eq!(
            c.staleness(500, Some("3"), 1_400),
            Some(Staleness::ModelVersion)
        );
        let moved_on = Cached {
            features_event_time: Some(901),
            ..c.clone()
        };
        assert_eq!(
            moved_on.staleness(500, Some("2"), 1_001),
            Some(Staleness::Features),
            "young, but the entity moved on since"
        );
        assert_eq!(
            moved_on.staleness(500, Some("3"), 1_001),
            Some(Staleness::ModelVersion)
        );
        assert_eq!(
            Cached {
                scored_at: None,
                ..c.clone()
            }
            .staleness(500, Some("2"), 1_400),
            None,
            "no prediction, nothing to judge"
        );
        // Scored ahead of the reader's clock: fresh within the bound, stale beyond it,
        // so a time far ahead cannot keep an entry fresh for ever.
        assert_eq!(c.staleness(500, Some("2"), 600), None);
        assert_eq!(c.staleness(500, Some("2"), 499), Some(Staleness::Age));
        for scored_at in [i64::MAX, i64::MIN] {
            let hostile = Cached {
                scored_at: Some(scored_at),
                ..c.clone()
            };
            assert_eq!(
                hostile.staleness(500, Some("2"), 1_400),
                Some(Staleness::Age),
                "scored_at {scored_at}"
            );
        }
    }

    #[test]
    fn script_replies_are_read_per_key() {
        use redis::Value;
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::Int(0),
            Value::Int(2),
            Value::BulkString(b"WRONGTYPE Operation against a key holding the wrong kind".to_vec()),
            Value::BulkString(b"OOM command not allowed".to_vec()),
            Value::BulkString(b"NOREPLICAS Not enough good replicas to write.".to_vec()),
            Value::BulkString(b"MISCONF Errors writing to the AOF file".to_vec()),
            Value::BulkString(b"ERR max number of clients reached".to_vec()),
        ]);
        let r = replies(reply.clone(), 8).unwrap();
        assert_eq!(r[0], Ok(Written::Written));
        assert_eq!(r[1], Ok(Written::Stale));
        assert_eq!(r[2], Ok(Written::Duplicate));
        assert!(
            matches!(&r[3], Err(Failure::Poison { class: ErrorClass::CacheWriteError, message }) if message.starts_with("WRONGTYPE"))
        );
        for passing in &r[4..] {
            assert!(passing.as_ref().unwrap_err().is_transient(), "{passing:?}");
        }
        assert!(
            matches!(replies(reply, 4), Err(Failure::Fatal(_))),
            "a reply that does not match the keys is not guessed at"
        );
        assert!(replies(Value::Int(1), 1).is_err());
    }

    /// Every argument of a call, as text.
    fn arguments(call: &ScriptCall<'_>) -> Vec<String> {
        call.cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8(b.to_vec()).unwrap(),
                _ => "<not a value>".into(),
            })
            .collect()
    }

    #[test]
    fn a_first_item_of_outsized_ids_reserves_nothing_for_the_others() {
        let typical = [13, 13, 8, 1, 1, 18, 5, 5, 6, 13];
        let per_item: usize = typical.iter().sum();
        assert_eq!(reserved_args(&typical, 511).sum::<usize>(), per_item * 511);
        assert_eq!(reserved_args(&typical, 511).count(), typical.len() * 511);
        // A megabyte event id in the first of 512 items: half a gigabyte, not reserved.
        assert_eq!(reserved_args(&[13, 13, 1 << 20, 1], 511).count(), 0);
        assert_eq!(reserved_args(&[usize::MAX, 1], 2).count(), 0, "no overflow");
        assert_eq!(reserved_args(&typical, 0).count(), 0);
    }

    #[test]
    fn a_script_call_lists_every_key_then_every_item_arguments() {
        let script = redis::Script::new("return 1");
        let hash = script.get_hash().to_string();
        let features = |x: f64| Features::from([("a".to_string(), x), ("bb".to_string(), -x)]);
        let (f1, f2, f3) = (features(1.5), features(2.0), features(0.25));
        let call = write_features(
            &script,
            "p:",
            [("e1", &f1, 10), ("entity-2", &f2, 20), ("e3", &f3, 30)],
            60,
        );
        assert_eq!(
            arguments(&call),
            [
                "EVALSHA",
                &hash,
                "3",
                "p:e1",
                "p:entity-2",
                "p:e3",
                "60",
                "10",
                r#"{"a":1.5,"bb":-1.5}"#,
                "20",
                r#"{"a":2.0,"bb":-2.0}"#,
                "30",
                r#"{"a":0.25,"bb":-0.25}"#,
            ]
        );
        let one = write_features(&script, "p:", [("e1", &f1, 10)], 60);
        assert_eq!(
            arguments(&one),
            [
                "EVALSHA",
                &hash,
                "1",
                "p:e1",
                "60",
                "10",
                r#"{"a":1.5,"bb":-1.5}"#
            ]
        );
        let none = write_features::<Features>(&script, "p:", [], 60);
        assert_eq!(arguments(&none), ["EVALSHA", &hash, "0", "60"]);
    }

    #[test]
    fn every_answer_indexes_its_place_in_all() {
        for (i, w) in Written::ALL.into_iter().enumerate() {
            assert_eq!(w as usize, i, "{w:?}");
        }
        let names: std::collections::HashSet<_> = Written::ALL.map(Written::as_str).into();
        assert_eq!(names.len(), Written::ALL.len());
    }

    #[test]
    fn a_lost_connection_is_transient() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(classify(&io).is_transient());
    }
}
