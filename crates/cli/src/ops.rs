//! Day-to-day operator commands: `tail`, `cache get`, `dlq list|replay`, `status`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use lanes_common::Settings;
use lanes_common::avro::AvroCodec;
use lanes_common::cache::{Cached, Staleness};
use lanes_common::dlq::{self, ErrorClass};
use lanes_common::kafka::{delivered, enqueue, group_lag, watermarks};
use lanes_common::model::ModelSpec;
use lanes_common::records::now_millis;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Value, json};

/// Exit code of `lanes status` when a service is down or not ready.
pub const EXIT_UNHEALTHY: i32 = 3;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic to read; Avro values are decoded through the registry.
    topic: String,
    /// Start at the beginning of the topic instead of its end.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<usize>,
    /// Stop when nothing arrives for this many seconds (default: never).
    #[arg(long)]
    idle_timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Show an entity's cached prediction, its age and whether it is fresh.
    Get { entity: String },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters with their class, reason and source.
    List {
        /// Only this error class (e.g. TOO_LARGE).
        #[arg(long)]
        class: Option<ErrorClass>,
        /// Stop after this many.
        #[arg(long)]
        max: Option<usize>,
    },
    /// Send dead letters back to the topic they came from (after fixing the cause).
    /// Each filter has its own consumer group, so a replay continues where the last
    /// one with the same filter stopped.
    Replay {
        /// Only this error class.
        #[arg(long)]
        class: Option<ErrorClass>,
        /// Replay everything present, ignoring earlier replays.
        #[arg(long)]
        from_beginning: bool,
        /// Show what would be replayed without producing anything.
        #[arg(long)]
        dry_run: bool,
        /// Key and value bytes read, replayed and committed at a time.
        #[arg(long, default_value_t = REPLAY_CHUNK_BYTES, hide = true)]
        chunk_bytes: usize,
    },
}

fn client_config(s: &Settings) -> rdkafka::ClientConfig {
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &s.kafka.bootstrap_servers);
    for (k, v) in &s.kafka.properties {
        cfg.set(k, v);
    }
    cfg
}

fn headers_json(m: &OwnedMessage) -> Value {
    let mut map = serde_json::Map::new();
    if let Some(h) = m.headers() {
        for hd in h.iter() {
            let v = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
            map.insert(hd.key.to_string(), v.map_or(Value::Null, Value::String));
        }
    }
    Value::Object(map)
}

/// A record as one JSON object: Avro decoded, JSON parsed, other bytes as text.
async fn record_json(codec: &AvroCodec, m: &OwnedMessage) -> Value {
    let value = match m.payload() {
        None => Value::Null,
        Some(p) if p.first() == Some(&0) => match codec.decode_json(p).await {
            Ok((v, id)) => json!({"schema_id": id, "record": v}),
            Err(e) => json!({"undecodable": e.to_string()}),
        },
        Some(p) => serde_json::from_slice(p)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p).into_owned())),
    };
    json!({
        "topic": m.topic(),
        "partition": m.partition(),
        "offset": m.offset(),
        "timestamp": m.timestamp().to_millis(),
        "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": headers_json(m),
        "value": value,
    })
}

fn assigned_reader(
    s: &Settings,
    topic: &str,
    group: &str,
    from_beginning: bool,
) -> anyhow::Result<StreamConsumer> {
    let mut cfg = client_config(s);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50");
    let c: StreamConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in watermarks(&c, topic)? {
        tpl.add_partition_offset(
            topic,
            p,
            if from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            },
        )?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

pub async fn tail(args: TailArgs, s: &Settings) -> anyhow::Result<()> {
    let codec = AvroCodec::new(&s.registry)?;
    let c = assigned_reader(s, &args.topic, "lanes-tail", args.from_beginning)?;
    let mut out = std::io::stdout().lock();
    let mut n = 0usize;
    while args.max.is_none_or(|max| n < max) {
        let next = match args.idle_timeout {
            Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), c.recv()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => c.recv().await,
        };
        let m = lanes_common::kafka::detach(&next?, true);
        writeln!(out, "{}", record_json(&codec, &m).await)?;
        out.flush()?;
        n += 1;
    }
    Ok(())
}

pub async fn cache(action: CacheAction, s: &Settings) -> anyhow::Result<()> {
    let CacheAction::Get { entity } = action;
    let mut redis = lanes_common::cache::client(&s.redis)?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to redis")?;
    let key = format!("{}{entity}", s.cache_writer.key_prefix);
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut redis)
        .await?;
    anyhow::ensure!(!h.is_empty(), "no cache entry for {entity:?} ({key})");
    let serving = s
        .model
        .resolve()
        .and_then(|d| ModelSpec::read(&d))
        .ok()
        .map(|m| m.version);
    let now = now_millis();
    let cached = Cached::from_hash(&h).filter(|c| c.prediction().is_some());
    let age_ms = cached
        .as_ref()
        .and_then(|c| c.scored_at)
        .map(|t| now.saturating_sub(t));
    let freshness = s.fallback_responder.freshness_ms;
    let verdict = match (&cached, age_ms) {
        (Some(c), Some(a)) => match c.staleness(freshness, serving.as_deref(), now) {
            Some(Staleness::ModelVersion) => format!(
                "stale: scored by model version {}, {} is serving",
                c.model_version.as_deref().unwrap_or("?"),
                serving.as_deref().unwrap_or("?")
            ),
            Some(Staleness::Features) => format!(
                "stale: online features of {} are newer than the scored event of {}",
                c.features_event_time.unwrap_or_default(),
                c.event_time.unwrap_or_default()
            ),
            Some(Staleness::Age) => format!("stale: {a} ms old, freshness is {freshness} ms"),
            None => format!("fresh: {a} ms old, freshness is {freshness} ms"),
        },
        _ => "no prediction (online features only)".to_string(),
    };
    let fields: BTreeMap<String, Value> = h
        .into_iter()
        .map(|(k, v)| {
            let parsed = if k == "features" {
                serde_json::from_str(&v).unwrap_or(Value::String(v))
            } else {
                Value::String(v)
            };
            (k, parsed)
        })
        .collect();
    let report = json!({"entity_id": entity, "key": key, "age_ms": age_ms, "verdict": verdict, "fields": fields});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Reads the DLQ from `from` up to its end at the time of the call.
async fn read_dead_letters(
    s: &Settings,
    group: &str,
    from_beginning: bool,
    mut each: impl FnMut(&OwnedMessage) -> bool,
) -> anyhow::Result<StreamConsumer> {
    let topic = &s.topics.dlq;
    let mut cfg = client_config(s);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50");
    let c: StreamConsumer = cfg.create()?;
    let ends: HashMap<i32, i64> = watermarks(&c, topic)?
        .into_iter()
        .map(|(p, _, hi)| (p, hi))
        .collect();
    let committed = c.committed_offsets(
        {
            let mut tpl = TopicPartitionList::new();
            for p in ends.keys() {
                tpl.add_partition(topic, *p);
            }
            tpl
        },
        Duration::from_secs(10),
    )?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    // The last offset read per partition; one before the start where nothing is read
    // yet, so a partition with nothing left counts as caught up.
    let mut positions: HashMap<i32, i64> = HashMap::new();
    for (p, end) in &ends {
        let start = match committed.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if !from_beginning => o,
            _ => 0,
        };
        tpl.add_partition_offset(topic, *p, Offset::Offset(start))?;
        remaining += (end - start).max(0);
        positions.insert(*p, start - 1);
    }
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Read to the end offsets taken at the start, then until the topic is quiet for a
    // moment: some brokers report an end offset that trails the last record.
    loop {
        let caught_up = remaining == 0
            || ends
                .iter()
                .all(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 >= *end);
        let wait = if caught_up {
            Duration::from_millis(1500)
        } else {
            Duration::from_secs(5)
        };
        let m = match tokio::time::timeout(wait, c.recv()).await {
            Ok(m) => lanes_common::kafka::detach(&m?, true),
            Err(_) if caught_up => break,
            Err(_) => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the dead-letter topic did not deliver its records within 60 s"
                );
                continue;
            }
        };
        positions.insert(m.partition(), m.offset());
        if !each(&m) {
            break;
        }
    }
    Ok(c)
}

fn class_of(m: &OwnedMessage) -> Option<ErrorClass> {
    m.headers()
        .and_then(|h| dlq::header_str(h, dlq::HEADER_CLASS))
        .and_then(|c| c.parse().ok())
}

pub async fn dlq_cmd(action: DlqAction, s: &Settings) -> anyhow::Result<()> {
    match action {
        DlqAction::List { class, max } => {
            let mut out = std::io::stdout().lock();
            let mut n = 0usize;
            let mut write_err = None;
            let _reader = read_dead_letters(s, "lanes-dlq-list", true, |m| {
                if class.is_none_or(|c| class_of(m) == Some(c)) {
                    let h = m.headers();
                    let get = |k| h.and_then(|h| dlq::header_str(h, k)).unwrap_or("");
                    let line = json!({
                        "dlq_offset": format!("{}/{}", m.partition(), m.offset()),
                        "class": get(dlq::HEADER_CLASS),
                        "message": get(dlq::HEADER_MESSAGE),
                        "stage": get(dlq::HEADER_STAGE),
                        "source": format!("{}[{}]@{}", get(dlq::HEADER_SOURCE_TOPIC), get(dlq::HEADER_SOURCE_PARTITION), get(dlq::HEADER_SOURCE_OFFSET)),
                        "failed_at": get(dlq::HEADER_FAILED_AT).parse::<i64>().ok(),
                        "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        "value": m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                    });
                    if let Err(e) = writeln!(out, "{line}") {
                        write_err = Some(e);
                        return false;
                    }
                    n += 1;
                }
                max.is_none_or(|max| n < max)
            })
            .await?;
            if let Some(e) = write_err {
                return Err(e.into());
            }
            eprintln!("{n} dead letters");
            Ok(())
        }
        DlqAction::Replay {
            class,
            from_beginning,
            dry_run,
            chunk_bytes,
        } => {
            let group = format!(
                "lanes-dlq-replay-{}",
                class.map_or("all".to_string(), |c| c.as_str().to_lowercase())
            );
            let inputs: BTreeSet<String> = inputs(s).into_iter().map(|i| i.3).collect();
            let producer = lanes_common::kafka::producer(&s.kafka, "lanes-dlq-replay")?;
            let mut per_topic: BTreeMap<String, usize> = BTreeMap::new();
            let mut left: BTreeMap<String, usize> = BTreeMap::new();
            let mut first = true;
            // A chunk at a time, each delivered and committed before the next is read:
            // a backlog of large letters is not held in memory at once.
            loop {
                let mut picked: Vec<(String, OwnedMessage)> = Vec::new();
                let mut bytes = 0;
                let mut last: HashMap<i32, i64> = HashMap::new();
                let consumer = read_dead_letters(s, &group, from_beginning && first, |m| {
                    last.insert(m.partition(), m.offset());
                    if class.is_some_and(|c| class_of(m) != Some(c)) {
                        return true;
                    }
                    match destination(m, &inputs) {
                        Ok(topic) => {
                            *per_topic.entry(topic.clone()).or_default() += 1;
                            if !dry_run {
                                bytes += m.payload().map_or(0, <[u8]>::len)
                                    + m.key().map_or(0, <[u8]>::len);
                                picked.push((topic, m.clone()));
                            }
                        }
                        Err(why) => *left.entry(why).or_default() += 1,
                    }
                    bytes < chunk_bytes
                })
                .await?;
                first = false;
                if dry_run {
                    break;
                }
                let mut pending = Vec::with_capacity(picked.len());
                for (topic, m) in &picked {
                    let from = format!("{}/{}/{}", s.topics.dlq, m.partition(), m.offset());
                    let headers = OwnedHeaders::new().insert(Header {
                        key: "lanes.replayed_from",
                        value: Some(from.as_bytes()),
                    });
                    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
                    if let Some(k) = m.key() {
                        record = record.key(k);
                    }
                    if let Some(v) = m.payload() {
                        record = record.payload(v);
                    }
                    pending.push(enqueue(&producer, record).await?);
                }
                for d in pending {
                    delivered(d)
                        .await
                        .context("a replayed record was not acknowledged")?;
                }
                if !last.is_empty() {
                    let mut tpl = TopicPartitionList::new();
                    for (p, o) in &last {
                        tpl.add_partition_offset(&s.topics.dlq, *p, Offset::Offset(o + 1))?;
                    }
                    consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
                }
                if bytes < chunk_bytes {
                    break;
                }
            }
            let verb = if dry_run { "would replay" } else { "replayed" };
            for (topic, n) in &per_topic {
                println!("{verb} {n} to {topic}");
            }
            println!(
                "{verb} {} dead letters{}",
                per_topic.values().sum::<usize>(),
                class.map(|c| format!(" of class {c}")).unwrap_or_default()
            );
            for (why, n) in &left {
                println!("left {n} dead letters: {why}");
            }
            Ok(())
        }
    }
}

/// Dead letters replayed per chunk, in key and value bytes, at most (past one letter).
const REPLAY_CHUNK_BYTES: usize = 64 << 20;

/// The topic a dead letter is replayed to: its source, when a Lanes service reads that
/// topic. Anyone who may write to the dead-letter topic could otherwise name any topic
/// (a registry's `_schemas`, another team's) and have an operator's replay write there.
fn destination(m: &OwnedMessage, inputs: &BTreeSet<String>) -> Result<String, String> {
    let source = m
        .headers()
        .and_then(|h| dlq::header_str(h, dlq::HEADER_SOURCE_TOPIC))
        .ok_or_else(|| "without a source topic".to_string())?;
    if inputs.contains(source) {
        Ok(source.to_string())
    } else if let Err(why) = lanes_common::kafka::check_topic_name(source) {
        // Not echoed: it could be a megabyte, or hold terminal escapes.
        Err(format!("a source topic that is no topic name: {why}"))
    } else {
        Err(format!(
            "source topic {source:?} is not read by a Lanes service"
        ))
    }
}

/// Each service's admin port and (group, input topic) pairs, for lag.
fn inputs(s: &Settings) -> Vec<(&'static str, u16, String, String)> {
    lanes_services::all()
        .into_iter()
        .flat_map(|def| {
            let port = (def.admin_port)(s);
            (def.inputs)(s)
                .into_iter()
                .map(move |(group, topic)| (def.name, port, group, topic))
        })
        .collect()
}

async fn readiness(http: &reqwest::Client, host: &str, port: u16) -> Option<Value> {
    let resp = http
        .get(format!("http://{host}:{port}/readyz"))
        .send()
        .await
        .ok()?;
    resp.json().await.ok()
}

async fn metrics_text(http: &reqwest::Client, host: &str, port: u16) -> Option<String> {
    http.get(format!("http://{host}:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The sum of the samples of metric `name` whose label `label` is `value`.
fn labelled_sum(text: &str, name: &str, label: &str, value: &str) -> f64 {
    let pair = format!("{label}=\"{value}\"");
    samples(text, name)
        .filter(|(line, _)| line.contains(&pair))
        // Not `sum`: the sum of no floats is -0.
        .fold(0.0, |a, (_, v)| a + v)
}

/// What `lanes status` says of the cache, from the responder's metrics: the hit ratio
/// against its floor, lookups by result, and the sampled stale share.
fn cache_lines(text: &str, s: &Settings) -> Vec<String> {
    let r = &s.fallback_responder;
    let mut lines = Vec::new();
    let ratio = sum_samples(text, "lanes_fallback_responder_hit_ratio");
    let floor = sum_samples(text, "lanes_fallback_responder_hit_ratio_floor");
    if let (Some(ratio), Some(floor)) = (ratio, floor) {
        lines.push(if ratio.is_nan() {
            format!("cache: no lookups in the last {} s", r.hit_ratio_window_s)
        } else {
            format!(
                "cache: hit ratio {:.1}% over the last {} s (floor {:.1}%){}",
                ratio * 100.0,
                r.hit_ratio_window_s,
                floor * 100.0,
                if ratio < floor {
                    ": UNDER THE FLOOR"
                } else {
                    ""
                }
            )
        });
        let counts: Vec<String> = lanes_fallback_responder::LOOKUP_RESULTS
            .iter()
            .map(|result| {
                let n = labelled_sum(
                    text,
                    "lanes_fallback_responder_cache_lookups_total",
                    "result",
                    result,
                );
                format!("{result} {n}")
            })
            .collect();
        lines.push(format!("cache: lookups since start: {}", counts.join(", ")));
    }
    if let Some(share) = sum_samples(text, "lanes_fallback_responder_stale_share") {
        lines.push(format!(
            "cache: {:.1}% of sampled entries are stale (older than {} ms, another model version, or newer online features)",
            share * 100.0,
            r.freshness_ms
        ));
    }
    if let Some(share) = sum_samples(text, "lanes_fallback_responder_serving_version_share") {
        lines.push(format!(
            "cache: {:.1}% of sampled entries are on the serving model version",
            share * 100.0
        ));
    }
    lines
}

/// The sample lines of metric `name` in Prometheus text, with their values.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines()
        .filter(move |l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| Some((l, l.rsplit(' ').next()?.parse().ok()?)))
}

/// The sum of the samples of metric `name` in Prometheus text; `None` if it has none.
pub(crate) fn sum_samples(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = samples(text, name).map(|(_, v)| v).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Prints each service's health, lag and staleness; returns the exit code.
pub async fn status(s: &Settings) -> anyhow::Result<i32> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let host = &s.admin.host;
    let up = readiness(&http, host, s.admin.ports.up).await;
    let mut healthy = true;
    println!(
        "{:<20} {:<10} {:<8} {:>10}  input",
        "service", "state", "admin", "lag"
    );
    let sc = s.clone();
    let lags = tokio::task::spawn_blocking(move || {
        inputs(&sc)
            .into_iter()
            .map(|(_, _, g, t)| group_lag(&sc.kafka, &g, &t).map_err(|e| e.to_string()))
            .collect::<Vec<_>>()
    })
    .await?;
    for ((name, port, group, topic), lag) in inputs(s).into_iter().zip(lags) {
        let (state, admin) = match readiness(&http, host, port).await {
            Some(r) if r["ready"] == true => ("ready", port.to_string()),
            Some(_) => ("NOT READY", port.to_string()),
            None => match &up {
                Some(r) if r["checks"][name] == "ok" => {
                    ("ready", format!("up:{}", s.admin.ports.up))
                }
                Some(_) => ("NOT READY", format!("up:{}", s.admin.ports.up)),
                None => ("DOWN", "-".to_string()),
            },
        };
        healthy &= state == "ready";
        let lag = lag
            .map(|l| l.to_string())
            .unwrap_or_else(|e| format!("? ({e})"));
        println!("{name:<20} {state:<10} {admin:<8} {lag:>10}  {topic} (group {group})");
    }
    let responder_port = if up.is_some() {
        s.admin.ports.up
    } else {
        s.admin.ports.fallback_responder
    };
    if let Some(text) = metrics_text(&http, host, responder_port).await {
        for line in cache_lines(&text, s) {
            println!("{line}");
        }
    }
    Ok(if healthy { 0 } else { EXIT_UNHEALTHY })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_tells_the_hit_ratio_against_its_floor_and_lookups_by_result() {
        let s = Settings::load_from(None, HashMap::new()).unwrap();
        let text = "\
lanes_fallback_responder_hit_ratio 0.8
lanes_fallback_responder_hit_ratio_floor 0.9
lanes_fallback_responder_cache_lookups_total{result=\"fresh\"} 8
lanes_fallback_responder_cache_lookups_total{result=\"miss\"} 1
lanes_fallback_responder_cache_lookups_total{result=\"stale_features\"} 1
lanes_fallback_responder_stale_share 0.25
lanes_fallback_responder_serving_version_share 0.5
";
        let lines = cache_lines(text, &s);
        assert_eq!(
            lines[0],
            "cache: hit ratio 80.0% over the last 60 s (floor 90.0%): UNDER THE FLOOR"
        );
        assert_eq!(
            lines[1],
            "cache: lookups since start: fresh 8, miss 1, stale_age 0, stale_version 0, stale_features 1, unavailable 0"
        );
        assert!(lines[2].starts_with("cache: 25.0% of sampled entries are stale"));
        assert_eq!(
            lines[3],
            "cache: 50.0% of sampled entries are on the serving model version"
        );
        let idle = text.replace("hit_ratio 0.8", "hit_ratio NaN");
        assert_eq!(
            cache_lines(&idle, &s)[0],
            "cache: no lookups in the last 60 s"
        );
        let healthy = text.replace("hit_ratio 0.8", "hit_ratio 0.95");
        assert!(cache_lines(&healthy, &s)[0].ends_with("(floor 90.0%)"));
    }
}
