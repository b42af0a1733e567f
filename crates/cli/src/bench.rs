//! `lanes bench`: the streaming lane's sustained throughput and event-to-prediction
//! latency under several window settings, beside the raw broker's produce and consume
//! rates measured in the same run. Each setting gets fresh topics and groups; the four
//! services run in this process as in `lanes up`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::admin::ReadyFlag;
use lanes_common::avro::AvroCodec;
use lanes_common::generator::Generator;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::records::{Prediction, now_millis};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events per throughput run.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Offered rate (events/s) of the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// Length of each latency run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Messages for the raw broker rates.
    #[arg(long, default_value_t = 100_000)]
    raw_messages: usize,
    /// Window delays to compare (ms).
    #[arg(long, value_delimiter = ',', default_value = "5,20,100")]
    delays: Vec<u64>,
    /// Window sizes to compare (events).
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    sizes: Vec<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-stream.json")]
    out: PathBuf,
}

pub(crate) fn unique(settings: &Settings, tag: &str) -> Settings {
    let mut s = settings.clone();
    lanes_services::namespace(&mut s, &format!("bench-{tag}-{}", now_millis()));
    s
}

pub(crate) fn reader(s: &Settings, topic: &str) -> anyhow::Result<StreamConsumer> {
    let mut cfg =
        lanes_common::kafka::consumer_config(&s.kafka, "lanes-bench", &format!("{topic}-reader"));
    cfg.set("enable.auto.commit", "false");
    let c: StreamConsumer = cfg.create()?;
    c.subscribe(&[topic])?;
    Ok(c)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Raw produce and consume rates of 200-byte messages, one client each.
async fn raw_rates(s: &Settings, n: usize) -> anyhow::Result<(f64, f64)> {
    let s = unique(s, "raw");
    let topic = s.topics.raw.clone();
    lanes_common::kafka::ensure_topics(&s.kafka, &[&topic]).await?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let payload = vec![b'x'; 200];
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let key = (i % 64).to_string();
        pending.push(
            enqueue(
                &producer,
                FutureRecord::to(&topic).key(&key).payload(&payload),
            )
            .await?,
        );
    }
    for d in pending {
        delivered(d).await?;
    }
    let produce = n as f64 / started.elapsed().as_secs_f64();
    let consumer = reader(&s, &topic)?;
    let mut first: Option<Instant> = None;
    for _ in 0..n {
        consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
    }
    let consume = n as f64 / first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    Ok((produce, consume))
}

/// One-hop produce -> consume latency (ms, sorted) of `n` messages paced at 200/s.
async fn one_hop(s: &Settings, n: usize) -> anyhow::Result<Vec<f64>> {
    let s = unique(s, "hop");
    let topic = s.topics.raw.clone();
    lanes_common::kafka::ensure_topics(&s.kafka, &[&topic]).await?;
    let consumer = reader(&s, &topic)?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let origin = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tokio::time::sleep_until((origin + Duration::from_millis(5 * i as u64)).into()).await;
            let sent = origin.elapsed().as_micros().to_string();
            let d = enqueue(
                &producer,
                FutureRecord::<str, str>::to(&topic).payload(&sent),
            )
            .await?;
            drop(d);
        }
        anyhow::Ok(producer)
    });
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("one-hop message lost")??;
        let sent: u128 = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        lat.push((origin.elapsed().as_micros() - sent) as f64 / 1000.0);
    }
    drop(sender.await??);
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

pub(crate) struct Lane {
    pub(crate) settings: Settings,
    pub(crate) metrics: prometheus::Registry,
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Lane {
    pub(crate) async fn start(
        s: Settings,
        services: &[lanes_common::service::ServiceDef],
    ) -> anyhow::Result<Self> {
        lanes_common::kafka::ensure_topics(&s.kafka, &s.topics.all()).await?;
        let token = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let mut tasks = Vec::new();
        let consumer = lanes_common::service::consumer_metrics(&registry)?;
        let flags =
            lanes_common::service::host(&s, services, &registry, &consumer, &token, |_, fut| {
                tasks.push(tokio::spawn(fut))
            });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flags.iter().all(ReadyFlag::is_set) {
            anyhow::ensure!(Instant::now() < deadline, "services not ready within 60s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            settings: s,
            metrics: registry,
            token,
            tasks,
        })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// Publishes `lines` (all at once, or paced at `rate` per second) and returns when every
/// event has a prediction: (seconds from first publish to last prediction, latencies in
/// ms from each event's publish to its prediction's arrival).
async fn drive(
    lane: &Lane,
    lines: Vec<(String, String)>,
    rate: Option<usize>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let s = &lane.settings;
    let consumer = reader(s, &s.topics.predictions)?;
    let codec = AvroCodec::new(&s.registry)?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    // Join the group before publishing, so the first predictions are not missed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = lines.len();
    let expected: std::collections::HashSet<String> =
        lines.iter().map(|(id, _)| id.clone()).collect();
    let started = Instant::now();
    let topic = s.topics.raw.clone();
    let sender = tokio::spawn(async move {
        let mut sent: HashMap<String, Instant> = HashMap::with_capacity(total);
        let mut pending = Vec::with_capacity(total);
        for (i, (id, line)) in lines.into_iter().enumerate() {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            sent.insert(id, Instant::now());
            pending.push(
                enqueue(
                    &producer,
                    FutureRecord::<str, str>::to(&topic).payload(&line),
                )
                .await?,
            );
        }
        for d in pending {
            delivered(d).await?;
        }
        anyhow::Ok(sent)
    });
    let mut arrived: HashMap<String, Instant> = HashMap::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrived.len() < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {total} predictions after 300s",
            arrived.len()
        );
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("no prediction for 30s")??;
        let p = codec
            .decode::<Prediction>(m.payload().unwrap_or_default())
            .await?
            .record;
        if expected.contains(&p.event_id) {
            arrived.entry(p.event_id).or_insert_with(Instant::now);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = sender.await??;
    let mut latencies: Vec<f64> = arrived
        .iter()
        .filter_map(|(id, at)| {
            sent.get(id)
                .map(|s| at.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok((elapsed, latencies))
}

pub(crate) fn events(seed: u64, n: usize) -> Vec<(String, String)> {
    Generator::new(seed, 10_000)
        .take(n)
        .map(|s| (s.event_id.clone(), s.raw_json()))
        .collect()
}

pub async fn run(args: BenchArgs, settings: &Settings) -> anyhow::Result<()> {
    eprintln!(
        "raw broker rates ({} messages of 200 bytes) ...",
        args.raw_messages
    );
    let (produce, consume) = raw_rates(settings, args.raw_messages).await?;
    let hop = one_hop(settings, 1000).await?;
    let (hop50, hop99) = (percentile(&hop, 0.5), percentile(&hop, 0.99));
    let mut rows = Vec::new();
    let mut seed = now_millis() as u64;
    for &delay in &args.delays {
        for &size in &args.sizes {
            let mut s = unique(settings, &format!("d{delay}-n{size}"));
            s.micro_batcher.max_delay_ms = delay;
            s.micro_batcher.max_events = size;
            eprintln!("window max_delay {delay} ms, max_events {size} ...");
            let lane = Lane::start(s, &lanes_services::all()).await?;
            seed += 1;
            let (secs, _) = drive(&lane, events(seed, args.events), None).await?;
            seed += 1;
            let paced = events(seed, args.rate * args.seconds as usize);
            let (_, lat) = drive(&lane, paced, Some(args.rate)).await?;
            lane.stop().await?;
            rows.push(json!({
                "max_delay_ms": delay,
                "max_events": size,
                "throughput_events_per_s": (args.events as f64 / secs).round(),
                "latency_rate_events_per_s": args.rate,
                "latency_p50_ms": (percentile(&lat, 0.5) * 10.0).round() / 10.0,
                "latency_p99_ms": (percentile(&lat, 0.99) * 10.0).round() / 10.0,
            }));
        }
    }
    let report = json!({
        "raw_broker": {
            "produce_msgs_per_s": produce.round(),
            "consume_msgs_per_s": consume.round(),
            "message_bytes": 200,
            "one_hop_p50_ms": (hop50 * 10.0).round() / 10.0,
            "one_hop_p99_ms": (hop99 * 10.0).round() / 10.0,
        },
        "lane": rows,
        "events_per_throughput_run": args.events,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;

    println!(
        "raw broker, one client, 200-byte messages: produce {produce:.0} msg/s, consume {consume:.0} msg/s"
    );
    println!();
    println!(
        "| max_delay_ms | max_events | events/s (burst of {}) | p50 ms @ {}/s | p99 ms @ {}/s |",
        args.events, args.rate, args.rate
    );
    println!("|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r["max_delay_ms"],
            r["max_events"],
            r["throughput_events_per_s"],
            r["latency_p50_ms"],
            r["latency_p99_ms"]
        );
    }
    println!();
    println!("written to {}", args.out.display());
    Ok(())
}
