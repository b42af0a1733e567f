//! `lanes demo`: publishes sample traffic (some of it invalid) to a running lane, waits
//! until every event is accounted for (a prediction or a dead letter), and prints a
//! summary: counts, dead letters by class, event-to-cache latency, cached predictions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::avro::AvroCodec;
use lanes_common::dlq::{self, ErrorClass};
use lanes_common::generator::Generator;
use lanes_common::records::{Prediction, now_millis};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Message, TopicPartitionList};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Valid events to publish.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// Invalid events to publish, spread over the error classes.
    #[arg(long, default_value_t = 40)]
    invalid: usize,
    /// Distinct cards (entities).
    #[arg(long, default_value_t = 1000)]
    cards: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

/// Invalid raw events of every class ingest knows, tagged with `run` so they are ours.
fn invalid_events(run: &str, n: usize) -> Vec<String> {
    let ok = r#""amount":12.5,"hour":3,"merchant_risk":0.2,"distance_km":4,"txn_count_1h":1,"avg_amount_30d":30,"amount_ratio":0.4,"card_age_days":90,"is_foreign":0"#;
    let shapes: Vec<Box<dyn Fn(usize) -> String>> = vec![
        Box::new(|i| {
            format!(r#"{{"event_id":"{run}-bad-{i}","entity_id":"card-1","features":{{{ok}}}"#)
        }),
        Box::new(|i| {
            format!(r#"{{"event_id":"{run}-bad-{i}","features":{{{ok},"is_online":1}}}}"#)
        }),
        Box::new(|i| {
            format!(
                r#"{{"event_id":"{run}-bad-{i}","entity_id":"card-1","features":{{{ok},"is_online":1,"ip":4}}}}"#
            )
        }),
        Box::new(|i| {
            format!(
                r#"{{"event_id":"{run}-bad-{i}","entity_id":"card-1","features":{{{ok},"is_online":"1"}}}}"#
            )
        }),
        Box::new(|i| {
            format!(
                r#"{{"event_id":"{run}-bad-{i}","entity_id":"card-1","features":{{{ok},"is_online":NaN}}}}"#
            )
        }),
        Box::new(|i| {
            format!(
                r#"{{"event_id":"{run}-bad-{i}","entity_id":"card-1","event_time":"last tuesday","features":{{{ok},"is_online":1}}}}"#
            )
        }),
    ];
    (0..n).map(|i| shapes[i % shapes.len()](i)).collect()
}

/// Current end offsets of `topic`, where this run's records will start.
fn ends(settings: &Settings, topic: &str) -> anyhow::Result<TopicPartitionList> {
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    for (k, v) in &settings.kafka.properties {
        cfg.set(k, v);
    }
    let c: BaseConsumer = cfg.create()?;
    lanes_common::kafka::end_offsets(&c, topic)
}

fn reader(settings: &Settings, from: &TopicPartitionList) -> anyhow::Result<StreamConsumer> {
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .set("group.id", "lanes-demo-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10");
    for (k, v) in &settings.kafka.properties {
        cfg.set(k, v);
    }
    let c: StreamConsumer = cfg.create()?;
    c.assign(from)?;
    Ok(c)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(args: DemoArgs, settings: &Settings) -> anyhow::Result<()> {
    let s = settings;
    lanes_common::kafka::ensure_topics(&s.kafka, &s.topics.all()).await?;
    let run = format!("demo{}", now_millis());
    let predictions_from = ends(s, &s.topics.predictions)?;
    let dlq_from = ends(s, &s.topics.dlq)?;
    let predictions = reader(s, &predictions_from)?;
    let dead = reader(s, &dlq_from)?;

    let seed = now_millis() as u64;
    let samples: Vec<_> = Generator::new(seed, args.cards).take(args.events).collect();
    let ids: HashSet<String> = samples.iter().map(|s| s.event_id.clone()).collect();
    let mut lines: Vec<String> = samples.iter().map(|s| s.raw_json()).collect();
    lines.extend(invalid_events(&run, args.invalid));
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-demo")?;
    let started = Instant::now();
    crate::publish::publish_lines(&producer, &s.topics.raw, &lines).await?;
    eprintln!(
        "published {} valid and {} invalid events to {}",
        args.events, args.invalid, s.topics.raw
    );

    let codec = AvroCodec::new(&s.registry)?;
    let mut predicted: HashMap<String, Prediction> = HashMap::new();
    let mut classes: BTreeMap<ErrorClass, usize> = BTreeMap::new();
    let mut dead_count = 0usize;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut last_report = Instant::now();
    while predicted.len() < ids.len() || dead_count < args.invalid {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out: {} of {} predictions, {} of {} dead letters",
            predicted.len(),
            ids.len(),
            dead_count,
            args.invalid
        );
        tokio::select! {
            m = predictions.recv() => {
                let m = m?;
                let p = codec.decode::<Prediction>(m.payload().unwrap_or_default()).await.context("decoding a prediction")?.record;
                if ids.contains(&p.event_id) {
                    predicted.insert(p.event_id.clone(), p);
                }
            }
            m = dead.recv() => {
                let m = m?;
                let class = m.headers().and_then(|h| dlq::header_str(h, dlq::HEADER_CLASS)).and_then(|c| c.parse().ok());
                let ours = m.payload().is_some_and(|v| v.windows(run.len()).any(|w| w == run.as_bytes()));
                if let (true, Some(class)) = (ours, class) {
                    *classes.entry(class).or_default() += 1;
                    dead_count += 1;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  ... {} predictions, {} dead letters",
                predicted.len(),
                dead_count
            );
            last_report = Instant::now();
        }
    }
    let elapsed = started.elapsed();

    // Event-to-cache latency from the cache itself: written_at (Redis clock) - ingested_at.
    let mut redis = lanes_common::cache::client(&s.redis)?
        .get_multiplexed_async_connection()
        .await?;
    let mut newest: BTreeMap<&str, &Prediction> = BTreeMap::new();
    for p in predicted.values() {
        let e = newest.entry(&p.entity_id).or_insert(p);
        if p.event_time > e.event_time {
            *e = p;
        }
    }
    let mut latencies = Vec::new();
    let mut shown = Vec::new();
    for (entity, p) in &newest {
        let key = format!("{}{entity}", s.cache_writer.key_prefix);
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut redis)
            .await?;
        if h.get("event_id") != Some(&p.event_id) {
            continue;
        }
        let written = h.get("written_at").and_then(|w| w.parse::<f64>().ok());
        let ingested = h.get("ingested_at").and_then(|i| i.parse::<i64>().ok());
        if let (Some(w), Some(i)) = (written, ingested) {
            latencies.push(w as i64 - i);
        }
        if shown.len() < 5 {
            shown.push((key, h));
        }
    }
    latencies.sort_unstable();

    println!();
    println!(
        "Lanes demo: {} events in {:.1?}",
        args.events + args.invalid,
        elapsed
    );
    println!("  events in            {}", args.events + args.invalid);
    println!("  predictions out      {}", predicted.len());
    println!("  dead letters         {dead_count}");
    for (class, n) in &classes {
        println!("    {class:<20} {n}");
    }
    let balanced = predicted.len() + dead_count == args.events + args.invalid;
    println!(
        "  in = out + dead      {}",
        if balanced { "yes" } else { "NO" }
    );
    println!(
        "  event-to-cache       p50 {} ms, p99 {} ms (over {} cached entities)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    println!(
        "  cached predictions (Redis, {}*):",
        s.cache_writer.key_prefix
    );
    for (key, h) in shown {
        println!(
            "    {key}: score {:.4} label {} model {} v{} lane {} event_time {}",
            h.get("score")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_default(),
            h.get("label").map(String::as_str).unwrap_or(""),
            h.get("model_name").map(String::as_str).unwrap_or(""),
            h.get("model_version").map(String::as_str).unwrap_or(""),
            h.get("lane").map(String::as_str).unwrap_or(""),
            h.get("event_time").map(String::as_str).unwrap_or(""),
        );
    }
    anyhow::ensure!(balanced, "counts do not reconcile");
    Ok(())
}
