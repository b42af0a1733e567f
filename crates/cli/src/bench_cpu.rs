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
use tokio::io::AsyncBufReadExt;

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
    /// Also drain the same number of events through the Python baseline
    /// (`bench/python_pipeline.py`, run by $LANES_PYTHON), alternating with Lanes.
    #[arg(long)]
    python: bool,
    /// After each Lanes drain, seconds of no traffic over which the idle CPU of `lanes up`
    /// is read (0: skip).
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Drains of each pipeline, alternated.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    rounds: usize,
}

/// Goal: idle CPU of `lanes up`, percent of one core.
const GOAL_IDLE_PERCENT: f64 = 5.0;
/// Goal: Lanes drains at least this many times as fast as the Python baseline.
const GOAL_PYTHON_RATIO: f64 = 2.0;

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
    let mut lanes_runs = Vec::new();
    let mut python_runs = Vec::new();
    for _ in 0..args.rounds {
        lanes_runs.push(drain_lanes(&args, settings, broker, redis).await?);
        if args.python {
            python_runs.push(drain_python(&args, settings, broker, redis).await?);
        }
    }
    let rate = |r: &serde_json::Value| r["events_per_s"].as_f64().unwrap_or(f64::NAN);
    let per =
        |r: &serde_json::Value, k: &str| r["cpu_us_per_event"][k].as_f64().unwrap_or(f64::NAN);
    let mean = |runs: &[serde_json::Value]| runs.iter().map(rate).sum::<f64>() / runs.len() as f64;
    let mut report = json!({"events": args.events, "lanes": lanes_runs});
    if args.python {
        report["python"] = json!(python_runs);
        report["drain_ratio"] = json!(mean(&lanes_runs) / mean(&python_runs));
        report["goal_drain_ratio"] = json!(GOAL_PYTHON_RATIO);
    }
    // The first Lanes run's figures stay at the top level, as before.
    if let Some(first) = lanes_runs.first().and_then(|r| r.as_object()) {
        for (k, v) in first {
            report[k] = v.clone();
        }
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!(
        "{} events per drain, {} build",
        args.events,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!();
    println!(
        "| run | pipeline | events/s | pipeline CPU µs/event | broker µs/event | redis µs/event |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (i, r) in lanes_runs.iter().enumerate() {
        println!(
            "| {} | lanes up | {:.0} | {:.1} | {:.1} | {:.1} |",
            i + 1,
            rate(r),
            per(r, "lanes"),
            per(r, "broker"),
            per(r, "redis")
        );
        if let Some(py) = python_runs.get(i) {
            println!(
                "| {} | python | {:.0} | {:.1} | {:.1} | {:.1} |",
                i + 1,
                rate(py),
                per(py, "python"),
                per(py, "broker"),
                per(py, "redis")
            );
        }
    }
    println!();
    let first = &lanes_runs[0];
    println!("| goal | measured | target |");
    println!("|---|---:|---:|");
    println!(
        "| lanes up CPU µs/event | {:.1} | <= {GOAL_LANES_US} |",
        per(first, "lanes")
    );
    println!(
        "| redis CPU µs/event | {:.1} | <= {GOAL_REDIS_US} |",
        per(first, "redis")
    );
    if let Some(idle) = first["lanes_idle_cpu_percent"].as_f64() {
        println!("| lanes up idle CPU, % of one core | {idle:.1} | <= {GOAL_IDLE_PERCENT} |");
    }
    if args.python {
        println!(
            "| drain rate, lanes / python | {:.2}x | >= {GOAL_PYTHON_RATIO}x |",
            mean(&lanes_runs) / mean(&python_runs)
        );
    }
    println!();
    println!(
        "peak RSS of lanes up: {:.0} MiB; written to {}",
        first["lanes_peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        args.out.display()
    );
    Ok(())
}

/// One drain through a child `lanes up` with its own topics and groups.
async fn drain_lanes(
    args: &BenchCpuArgs,
    settings: &Settings,
    broker: u32,
    redis: u32,
) -> anyhow::Result<serde_json::Value> {
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
    let result = measure(args, &s, lanes, broker, redis).await;
    let _ = process::signal(lanes, "CONT");
    let _ = process::signal(lanes, "TERM");
    let _ = up.wait();
    forget_keys(&s).await?;
    result
}

/// Deletes the cache entries a drain wrote (its own key prefix), so repeated runs do not
/// fill the shared Redis.
async fn forget_keys(s: &Settings) -> anyhow::Result<()> {
    let client = lanes_common::cache::client(&s.redis)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys) =
            lanes_common::cache::scan(&mut c, &s.cache_writer.key_prefix, cursor, 1000).await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Publishes `n` generated raw events to `topic` and waits for every acknowledgement.
async fn publish(s: &Settings, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let mut pending = Vec::with_capacity(n);
    for (_, line) in events(now_seed(), n) {
        pending.push(
            enqueue(
                &producer,
                FutureRecord::<str, str>::to(topic).payload(&line),
            )
            .await?,
        );
    }
    for d in pending {
        delivered(d).await?;
    }
    Ok(())
}

/// One drain through the Python baseline, on its own topics, group and key prefix.
async fn drain_python(
    args: &BenchCpuArgs,
    settings: &Settings,
    broker: u32,
    redis: u32,
) -> anyhow::Result<serde_json::Value> {
    let s = unique(settings, "py");
    lanes_common::kafka::ensure_topics(&s.kafka, &[&s.topics.raw, &s.topics.predictions]).await?;
    publish(&s, &s.topics.raw, args.events).await?;
    let python = std::env::var("LANES_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = find_up(std::path::Path::new("bench/python_pipeline.py"))
        .context("bench/python_pipeline.py not found here or in a parent folder")?;
    let model = s.model.resolve()?;
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--bootstrap", &s.kafka.bootstrap_servers])
        .args(["--registry", &s.registry.url])
        .args(["--redis", &s.redis.url])
        .args(["--raw", &s.topics.raw])
        .args(["--predictions", &s.topics.predictions])
        .args(["--group", &format!("{}-python", s.ingest.group)])
        .args(["--key-prefix", &s.cache_writer.key_prefix])
        .args(["--events", &args.events.to_string()])
        .arg("--model-dir")
        .arg(&model)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {python} {}", script.display()))?;
    let pid = child.id().context("python exited at once")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let ready = next_line(&mut lines, "ready line").await?;
    anyhow::ensure!(ready.trim() == "ready", "python baseline printed {ready:?}");
    let before = [cpu_seconds(broker)?, cpu_seconds(redis)?];
    let done = next_line(&mut lines, "result").await?;
    let after = [cpu_seconds(broker)?, cpu_seconds(redis)?];
    let peak = process::peak_rss_mib(pid);
    let _ = child.wait().await;
    forget_keys(&s).await?;
    let done: serde_json::Value =
        serde_json::from_str(&done).with_context(|| format!("python baseline printed {done:?}"))?;
    let drain = done["drain_s"].as_f64().context("no drain_s")?;
    let n = args.events as f64;
    Ok(json!({
        "events": args.events,
        "drain_s": drain,
        "events_per_s": n / drain,
        "cpu_us_per_event": {
            "python": done["cpu_s"].as_f64().unwrap_or(f64::NAN) * 1e6 / n,
            "broker": (after[0] - before[0]) * 1e6 / n,
            "redis": (after[1] - before[1]) * 1e6 / n,
        },
        "peak_rss_mib": peak,
    }))
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
    publish(s, &s.topics.raw, args.events).await?;
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
    let peak = process::peak_rss_mib(lanes);
    let idle_percent = if args.idle_secs > 0 {
        // Let the last commits and window closes pass first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu, at) = (cpu_seconds(lanes)?, Instant::now());
        tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
        Some((cpu_seconds(lanes)? - cpu) * 100.0 / at.elapsed().as_secs_f64())
    } else {
        None
    };
    let us = |i: usize| (after[i] - before[i]) * 1e6 / args.events as f64;
    Ok(json!({
        "events": args.events,
        "drain_s": drain,
        "events_per_s": args.events as f64 / drain,
        "cpu_us_per_event": {"lanes": us(0), "broker": us(1), "redis": us(2)},
        "goal_us_per_event": {"lanes": GOAL_LANES_US, "redis": GOAL_REDIS_US},
        "lanes_peak_rss_mib": peak,
        "lanes_idle_cpu_percent": idle_percent,
        "goal_idle_cpu_percent": GOAL_IDLE_PERCENT,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    }))
}

/// The baseline's next line of output, within 300 s.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    what: &str,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(300), lines.next_line())
        .await
        .with_context(|| format!("python baseline: no {what} within 300 s"))?
        .with_context(|| format!("python baseline: reading its {what}"))?
        .with_context(|| format!("python baseline exited before its {what}"))
}

/// `rel` under the current folder or the nearest parent that has it.
fn find_up(rel: &std::path::Path) -> Option<PathBuf> {
    let here = std::env::current_dir().ok()?;
    here.ancestors().map(|d| d.join(rel)).find(|p| p.is_file())
}

fn now_seed() -> u64 {
    lanes_common::records::now_millis() as u64
}
