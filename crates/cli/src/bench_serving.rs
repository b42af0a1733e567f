//! `lanes bench-serving`: request -> response latency over Kafka through the
//! fallback-responder at 100% fresh cache hits and at 100% misses with features, beside
//! the broker's raw round trip (a bare echo: consume a request, produce it back) measured
//! in the same run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::avro::AvroCodec;
use lanes_common::generator::Generator;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::records::{PredictionRequest, PredictionResponse, ResponseSource, now_millis};
use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use serde_json::json;

use crate::bench::{Lane, percentile, reader, unique};

#[derive(Debug, Args)]
pub struct ServingArgs {
    /// Requests per scenario.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Offered rate, requests per second.
    #[arg(long, default_value_t = 500)]
    rate: usize,
    /// Distinct entities.
    #[arg(long, default_value_t = 1000)]
    entities: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-serving.json")]
    out: PathBuf,
}

/// Sends `n` payloads paced at `rate`/s to `to` and waits for each answer on `from`;
/// `id_of` reads the request id back from an answer, and whether the answer is the one
/// expected. Returns round trips in ms, sorted, and the share of unexpected answers.
async fn round_trips(
    s: &Settings,
    to: &str,
    from: &str,
    payloads: Vec<(String, Vec<u8>)>,
    rate: usize,
    id_of: impl Fn(&[u8]) -> futures_id::IdFuture,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let consumer = reader(s, from)?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = payloads.len();
    let expected: std::collections::HashSet<String> =
        payloads.iter().map(|(id, _)| id.clone()).collect();
    // New clients' first records wait for connections, metadata, a producer id and
    // first fetches (about 100 ms, in the echo twice): the first half second of
    // requests is answered but not counted.
    let warm_up: std::collections::HashSet<String> = payloads
        .iter()
        .take((rate / 2).min(n / 10))
        .map(|(id, _)| id.clone())
        .collect();
    let mut unexpected = 0usize;
    let origin = Instant::now();
    let to = to.to_string();
    let sender = tokio::spawn(async move {
        let mut sent = HashMap::with_capacity(n);
        let mut pending = Vec::with_capacity(n);
        for (i, (id, payload)) in payloads.into_iter().enumerate() {
            tokio::time::sleep_until(
                (origin + Duration::from_secs_f64(i as f64 / rate as f64)).into(),
            )
            .await;
            sent.insert(id.clone(), Instant::now());
            pending
                .push(enqueue(&producer, FutureRecord::to(&to).key(&id).payload(&payload)).await?);
        }
        for d in pending {
            delivered(d).await?;
        }
        anyhow::Ok(sent)
    });
    let mut arrived: HashMap<String, Instant> = HashMap::with_capacity(n);
    while arrived.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("no answer for 30s")??;
        let at = Instant::now();
        // The topic may hold answers of earlier runs: only this run's count.
        if let Some((id, as_expected)) = id_of(m.payload().unwrap_or_default()).await
            && expected.contains(&id)
        {
            unexpected += !as_expected as usize;
            arrived.entry(id).or_insert(at);
        }
    }
    let sent = sender.await??;
    let mut rtt: Vec<f64> = arrived
        .iter()
        .filter(|(id, _)| !warm_up.contains(*id))
        .filter_map(|(id, at)| {
            sent.get(id)
                .map(|s| at.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    rtt.sort_by(f64::total_cmp);
    Ok((rtt, unexpected as f64 / n.max(1) as f64))
}

mod futures_id {
    pub type IdFuture = futures::future::BoxFuture<'static, Option<(String, bool)>>;
}

/// The broker floor: an echo that produces each request straight back.
async fn echo_round_trips(s: &Settings, args: &ServingArgs) -> anyhow::Result<(Vec<f64>, f64)> {
    let s = unique(s, "echo");
    let (a, b) = (s.topics.requests.clone(), s.topics.responses.clone());
    lanes_common::kafka::ensure_topics(&s.kafka, &[&a, &b]).await?;
    let echo_in = reader(&s, &a)?;
    let echo_out = lanes_common::kafka::producer(&s.kafka, "lanes-bench-echo")?;
    let b2 = b.clone();
    let echo = tokio::spawn(async move {
        loop {
            let m = echo_in.recv().await?;
            let d = enqueue(
                &echo_out,
                FutureRecord::<[u8], [u8]>::to(&b2).payload(m.payload().unwrap_or_default()),
            )
            .await?;
            drop(d);
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    let payloads: Vec<(String, Vec<u8>)> = (0..args.requests)
        .map(|i| (format!("echo-{i}"), format!("echo-{i}").into_bytes()))
        .collect();
    let rtt = round_trips(&s, &a, &b, payloads, args.rate, |p| {
        let id = String::from_utf8(p.to_vec()).ok().map(|id| (id, true));
        Box::pin(async move { id })
    })
    .await;
    echo.abort();
    rtt
}

async fn responder_round_trips(
    lane: &Lane,
    args: &ServingArgs,
    hits: bool,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let s = &lane.settings;
    let codec = AvroCodec::new(&s.registry)?;
    let samples: Vec<_> = Generator::new(now_millis() as u64, args.entities)
        .take(args.requests)
        .collect();
    let mut payloads = Vec::with_capacity(samples.len());
    for (i, sample) in samples.iter().enumerate() {
        let req = PredictionRequest {
            request_id: format!("{}-{i}", if hits { "hit" } else { "miss" }),
            entity_id: if hits {
                sample.entity_id.clone()
            } else {
                format!("unseen-{i}")
            },
            features: (!hits).then(|| sample.feature_map()),
            max_age_ms: None,
            reply_topic: None,
            requested_at: now_millis(),
            stale_while_refresh: None,
        };
        payloads.push((
            req.request_id.clone(),
            codec.encode(&s.topics.requests, &req).await?,
        ));
    }
    let expected = if hits {
        ResponseSource::Cache
    } else {
        ResponseSource::Realtime
    };
    round_trips(
        s,
        &s.topics.requests,
        &s.topics.responses,
        payloads,
        args.rate,
        move |p| {
            let (codec, p) = (codec.clone(), p.to_vec());
            Box::pin(async move {
                let r = codec.decode::<PredictionResponse>(&p).await.ok()?.record;
                Some((r.request_id, r.source == expected))
            })
        },
    )
    .await
}

/// Fresh predictions for every entity, written as the cache-writer would.
async fn seed(s: &Settings, entities: usize) -> anyhow::Result<()> {
    let mut redis = lanes_common::cache::client(&s.redis)?
        .get_multiplexed_async_connection()
        .await?;
    let now = now_millis();
    let mut pipe = redis::pipe();
    for i in 0..entities {
        pipe.cmd("HSET")
            .arg(format!("{}card-{i}", s.cache_writer.key_prefix))
            .arg(&[
                ("score", "0.01"),
                ("model_name", "fraud"),
                ("model_version", "1"),
                ("lane", "BATCH"),
            ])
            .arg("event_time")
            .arg(now)
            .arg("scored_at")
            .arg(now)
            .ignore();
    }
    pipe.query_async::<()>(&mut redis).await?;
    Ok(())
}

pub async fn run(args: ServingArgs, settings: &Settings) -> anyhow::Result<()> {
    eprintln!(
        "broker echo round trip ({} requests at {}/s) ...",
        args.requests, args.rate
    );
    let (echo, _) = echo_round_trips(settings, &args).await?;
    let s = unique(settings, "serving");
    seed(&s, args.entities).await?;
    let lane = Lane::start(s, &[lanes_fallback_responder::def()]).await?;
    eprintln!("100% fresh hits ...");
    let (hits, hits_wrong) = responder_round_trips(&lane, &args, true).await?;
    eprintln!("100% misses with features ...");
    let (misses, misses_wrong) = responder_round_trips(&lane, &args, false).await?;
    for family in lane.metrics.gather() {
        if family.name() == "lanes_fallback_responder_response_seconds"
            || family.name() == "lanes_fallback_responder_scoring_seconds"
        {
            let h = family.get_metric()[0].get_histogram();
            eprintln!(
                "{}: mean {:.3} ms over {}",
                family.name(),
                h.get_sample_sum() / h.get_sample_count().max(1) as f64 * 1000.0,
                h.get_sample_count()
            );
        }
    }
    lane.stop().await?;
    let row = |name: &str, v: &[f64], wrong: f64| {
        json!({"scenario": name, "p50_ms": (percentile(v, 0.5) * 10.0).round() / 10.0,
               "p99_ms": (percentile(v, 0.99) * 10.0).round() / 10.0, "wrong_source_share": wrong})
    };
    let rows = vec![
        row("broker echo round trip", &echo, 0.0),
        row("fresh cache hit (CACHE)", &hits, hits_wrong),
        row("miss with features (REALTIME)", &misses, misses_wrong),
    ];
    let report = json!({
        "requests_per_scenario": args.requests,
        "rate_per_s": args.rate,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "scenarios": rows,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("| scenario | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["p50_ms"],
            r["p99_ms"]
        );
    }
    let p99 = |i: usize| rows[i]["p99_ms"].as_f64().unwrap_or(f64::NAN);
    println!();
    println!("| goal | measured | target |");
    println!("|---|---:|---:|");
    println!("| hit p99 / echo p99 | {:.2}x | <= 2.5x |", p99(1) / p99(0));
    println!(
        "| miss p99 - hit p99 | {:.1} ms | <= 2 ms |",
        p99(2) - p99(1)
    );
    println!();
    println!(
        "{} requests each at {}/s; written to {}",
        args.requests,
        args.rate,
        args.out.display()
    );
    anyhow::ensure!(
        hits_wrong == 0.0 && misses_wrong == 0.0,
        "some answers came from the wrong source"
    );
    Ok(())
}
