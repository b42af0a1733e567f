//! `lanes bench-cpu`: CPU time per event of the streaming services together, beside the
//! broker's and Redis's on the same drain. `lanes up` runs as a child process with its
//! own topics and groups; it is stopped (SIGSTOP) while the events are published, so
//! the figure is the drain alone: process CPU (user + system, every thread) from
//! SIGCONT until the cache-writer has handled every prediction (its metrics).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::process;
use rdkafka::producer::FutureRecord;
use serde_json::json;

use crate::bench::{events, unique};

/// Goal of the performance work: streaming services' CPU per event.
const GOAL_LANES_US: f64 = 15.0;
/// Goal for Redis's CPU per event.
const GOAL_REDIS_US: f64 = 8.0;

#[derive(Debug, Args)]
pub struct BenchCpuArgs {
    /// Events drained (at least one: the figures are per event).
    #[arg(long, default_value_t = 60_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    events: usize,
    /// The broker's process id (default: the process named `tansu`).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-cpu.json")]
    out: PathBuf,
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    process::cpu_seconds(pid).with_context(|| format!("no CPU time for process {pid}"))
}

/// The process named `name`, if exactly one runs.
fn pid_named(name: &str) -> Option<u32> {
    let mut found = std::fs::read_dir("/proc").ok()?.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

async fn redis_pid(s: &Settings) -> anyhow::Result<u32> {
    let client = redis::Client::open(s.redis.url.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no process_id in Redis INFO")
}

/// Predictions the cache-writer of `lanes up` has handled (written, stale or
/// duplicate), from its metrics.
async fn cache_writes(http: &reqwest::Client, metrics: &str) -> anyhow::Result<f64> {
    let text = http.get(metrics).send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("lanes_cache_writer_writes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub async fn run(args: BenchCpuArgs, settings: &Settings) -> anyhow::Result<()> {
    let broker = args
        .broker_pid
        .or_else(|| pid_named("tansu"))
        .context("no single process named tansu: pass --broker-pid")?;
    let redis = redis_pid(settings).await?;
    let mut s = unique(settings, "cpu");
    s.admin.ports.up = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    lanes_common::kafka::ensure_topics(&s.kafka, &s.topics.all()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("lanes.toml");
    std::fs::write(&config, toml::to_string(&s)?)?;

    let mut up = std::process::Command::new(std::env::current_exe()?)
        .arg("up")
        .env(lanes_common::config::CONFIG_FILE_ENV, &config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting lanes up")?;
    let lanes = up.id();
    let result = measure(&args, &s, lanes, broker, redis).await;
    let _ = process::signal(lanes, "CONT");
    let _ = process::signal(lanes, "TERM");
    let _ = up.wait();
    let report = result?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    let per = |k: &str| report["cpu_us_per_event"][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "drained {} events in {:.2} s ({:.0} events/s), {} build",
        args.events,
        report["drain_s"].as_f64().unwrap_or(f64::NAN),
        report["events_per_s"].as_f64().unwrap_or(f64::NAN),
        report["profile"].as_str().unwrap_or("?")
    );
    println!();
    println!("| process | CPU µs/event | goal |");
    println!("|---|---:|---:|");
    println!(
        "| lanes up (ingest, micro-batcher, scorer, cache-writer) | {:.1} | <= {GOAL_LANES_US} |",
        per("lanes")
    );
    println!("| broker (tansu) | {:.1} | reported |", per("broker"));
    println!("| redis | {:.1} | <= {GOAL_REDIS_US} |", per("redis"));
    println!();
    println!(
        "peak RSS of lanes up: {:.0} MiB; written to {}",
        report["lanes_peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        args.out.display()
    );
    Ok(())
}

async fn measure(
    args: &BenchCpuArgs,
    s: &Settings,
    lanes: u32,
    broker: u32,
    redis: u32,
) -> anyhow::Result<serde_json::Value> {
    let ready = format!("http://127.0.0.1:{}/readyz", s.admin.ports.up);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(&ready)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "lanes up not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let its consumers settle into their groups before they are stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    process::signal(lanes, "STOP")?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let mut pending = Vec::with_capacity(args.events);
    for (_, line) in events(now_seed(), args.events) {
        pending.push(
            enqueue(
                &producer,
                FutureRecord::<str, str>::to(&s.topics.raw).payload(&line),
            )
            .await?,
        );
    }
    for d in pending {
        delivered(d).await?;
    }
    let before = [
        cpu_seconds(lanes)?,
        cpu_seconds(broker)?,
        cpu_seconds(redis)?,
    ];
    let started = Instant::now();
    process::signal(lanes, "CONT")?;
    let metrics = format!("http://127.0.0.1:{}/metrics", s.admin.ports.up);
    let deadline = Instant::now() + Duration::from_secs(300);
    while cache_writes(&http, &metrics).await? < args.events as f64 {
        anyhow::ensure!(Instant::now() < deadline, "not drained within 300 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain = started.elapsed().as_secs_f64();
    let after = [
        cpu_seconds(lanes)?,
        cpu_seconds(broker)?,
        cpu_seconds(redis)?,
    ];
    let us = |i: usize| (after[i] - before[i]) * 1e6 / args.events as f64;
    Ok(json!({
        "events": args.events,
        "drain_s": drain,
        "events_per_s": args.events as f64 / drain,
        "cpu_us_per_event": {"lanes": us(0), "broker": us(1), "redis": us(2)},
        "goal_us_per_event": {"lanes": GOAL_LANES_US, "redis": GOAL_REDIS_US},
        "lanes_peak_rss_mib": process::peak_rss_mib(lanes),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    }))
}

fn now_seed() -> u64 {
    lanes_common::records::now_millis() as u64
}
