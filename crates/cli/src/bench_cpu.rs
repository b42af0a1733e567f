//! `lanes bench-cpu`: CPU time per event of the streaming services together, beside the
//! broker's and Redis's on the same drain. `lanes up` runs as a child process with its
//! own topics and groups; it is stopped (SIGSTOP) while the events are published, so
//! the figure is the drain alone: process CPU (user + system, every thread) from
//! SIGCONT until the cache-writer has handled the prediction of every event (its
//! metrics).
//!
//! With `--per-service` each service runs as its own binary instead (the release
//! binaries beside this one), the fallback-responder too, answering requests published
//! beside the events, so the peak memory of every service is read under the same drain.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::generator::Sample;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::process;
use rdkafka::producer::FutureRecord;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::bench::{events, footprint_then_forget_keys, forget_keys, unique};

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
    /// Drains of each pipeline, alternated; the goals are read at the median.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    rounds: usize,
    /// Run each service as its own process (`lanes-ingest`, ... beside this binary),
    /// with the fallback-responder answering `--requests` requests during the drain,
    /// and report each one's CPU and peak memory.
    #[arg(long)]
    per_service: bool,
    /// Requests to the fallback-responder during a `--per-service` drain (with features,
    /// for entities of the drained events: hits once cached, real-time scores before).
    #[arg(long, default_value_t = 6_000)]
    requests: usize,
    /// Entities the drained events are spread over, evenly: fewer make each entity come
    /// back more often within a cache-writer pipeline (a busy card, a hot user).
    #[arg(long, default_value_t = crate::bench::ENTITIES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    entities: usize,
}

/// Goal: peak RSS of the services without a model, MiB.
const GOAL_RSS_PLAIN_MIB: f64 = 64.0;
/// Goal: peak RSS of the services that hold ONNX Runtime (scorer, responder), MiB.
const GOAL_RSS_MODEL_MIB: f64 = 128.0;
/// Goal: peak RSS of `lanes up`, MiB.
const GOAL_RSS_UP_MIB: f64 = 256.0;

/// A service of the pipeline under test, as its own process or all in `lanes up`.
struct Proc {
    name: &'static str,
    child: std::process::Child,
    admin_port: u16,
    goal_rss_mib: f64,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Goal: idle CPU of `lanes up`, percent of one core.
const GOAL_IDLE_PERCENT: f64 = 5.0;
/// Goal: Lanes drains at least this many times as fast as the Python baseline.
const GOAL_PYTHON_RATIO: f64 = 2.0;

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    process::cpu_seconds(pid).with_context(|| format!("no CPU time for process {pid}"))
}

/// The median of `xs`, NaN for none: on a shared machine a busy neighbour inflates some
/// drains, and the median of several moves least.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
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

/// A section of Redis's `INFO`.
async fn redis_info(s: &Settings, section: &str) -> anyhow::Result<String> {
    let client = lanes_common::cache::client(&s.redis)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("INFO").arg(section).query_async(&mut c).await?)
}

async fn redis_pid(s: &Settings) -> anyhow::Result<u32> {
    redis_info(s, "server")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no process_id in Redis INFO")
}

/// Calls and microseconds of each command Redis has run (`INFO commandstats`), by name.
async fn redis_commands(s: &Settings) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    Ok(parse_commandstats(&redis_info(s, "commandstats").await?))
}

/// `cmdstat_hget:calls=3,usec=5,...` lines as `hget -> (3, 5)`.
fn parse_commandstats(info: &str) -> BTreeMap<String, (f64, f64)> {
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))?
                    .parse::<f64>()
                    .ok()
            };
            Some((name.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// Commands the cache scripts run; their time inside a script is Redis's work on the
/// entries, the rest of a script call's time the script's own (Lua, arguments).
const SCRIPT_COMMANDS: [&str; 5] = ["hget", "hmget", "hset", "expire", "time"];

/// Per event over a drain, from `INFO commandstats` before and after: each script
/// command's calls, and Redis's microseconds in those commands and in the scripts'
/// own work. All clients count (the responder's reads too, in `--per-service`).
fn redis_per_event(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
    n: f64,
) -> serde_json::Value {
    let delta = |name: &str| {
        let (c0, u0) = before.get(name).copied().unwrap_or_default();
        let (c1, u1) = after.get(name).copied().unwrap_or_default();
        (c1 - c0, u1 - u0)
    };
    let calls: serde_json::Map<String, serde_json::Value> = SCRIPT_COMMANDS
        .iter()
        .map(|&c| (c.to_string(), json!(delta(c).0 / n)))
        .collect();
    let in_commands: f64 = SCRIPT_COMMANDS.iter().map(|&c| delta(c).1).sum();
    let (script_calls, scripts) = delta("evalsha");
    json!({
        "script_calls": script_calls / n,
        "calls": calls,
        "us_in_commands": in_commands / n,
        "us_in_scripts_own_work": (scripts - in_commands).max(0.0) / n,
    })
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
    let figures = |k: &str| -> Vec<f64> { lanes_runs.iter().map(|r| per(r, k)).collect() };
    let medians = |k: &str| median(figures(k));
    let mut report = json!({
        "events": args.events,
        "lanes": lanes_runs,
        "median_cpu_us_per_event": {
            "lanes": medians("lanes"),
            "broker": medians("broker"),
            "redis": medians("redis"),
        },
    });
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
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
            i + 1,
            if args.per_service {
                "lanes, one process per service"
            } else {
                "lanes up"
            },
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
    // Over several drains the goals are read at the median, with the range beside it.
    let over_runs = |k: &str| {
        let xs = figures(k);
        let (lo, hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        match xs.len() {
            1 => format!("{:.1}", xs[0]),
            n => format!("{:.1} (median of {n} drains, {lo:.1}-{hi:.1})", median(xs)),
        }
    };
    println!("| goal | measured | target |");
    println!("|---|---:|---:|");
    println!(
        "| streaming services' CPU µs/event | {} | <= {GOAL_LANES_US} |",
        over_runs("lanes")
    );
    println!(
        "| redis CPU µs/event | {} | <= {GOAL_REDIS_US} |",
        over_runs("redis")
    );
    if let Some(idle) = first["lanes_idle_cpu_percent"].as_f64() {
        println!(
            "| idle CPU of {}, % of one core | {idle:.1} | <= {GOAL_IDLE_PERCENT} |",
            if args.per_service {
                "the five services"
            } else {
                "lanes up"
            }
        );
    }
    let r = &first["redis_per_event"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "| Redis per event ({} entities): HGET / HMGET / HSET calls | {:.2} / {:.2} / {:.2} | |",
        args.entities,
        f(&r["calls"]["hget"]),
        f(&r["calls"]["hmget"]),
        f(&r["calls"]["hset"])
    );
    println!(
        "| Redis µs per event: in those commands / in the scripts' own work | {:.1} / {:.1} | |",
        f(&r["us_in_commands"]),
        f(&r["us_in_scripts_own_work"])
    );
    let cache = &first["redis_cache"];
    println!(
        "| Redis bytes per cached entity ({} entities; hash encodings {}) | {:.0} | |",
        cache["entries"],
        cache["encodings"],
        cache["mean_entry_bytes"].as_f64().unwrap_or(f64::NAN)
    );
    if args.python {
        println!(
            "| drain rate, lanes / python | {:.2}x | >= {GOAL_PYTHON_RATIO}x |",
            mean(&lanes_runs) / mean(&python_runs)
        );
    }
    for svc in first["services"].as_array().into_iter().flatten() {
        println!(
            "| peak RSS of {}, MiB | {:.0} | <= {} |",
            svc["service"].as_str().unwrap_or("?"),
            svc["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            svc["goal_peak_rss_mib"]
        );
    }
    if args.per_service {
        println!();
        println!("| service | CPU µs per event (responder: per request) |");
        println!("|---|---:|");
        for svc in first["services"].as_array().into_iter().flatten() {
            println!(
                "| {} | {:.1} |",
                svc["service"].as_str().unwrap_or("?"),
                svc["cpu_us_per_item"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    println!();
    println!("written to {}", args.out.display());
    Ok(())
}

/// One drain through a child `lanes up` (or, with `--per-service`, one child per
/// service) with its own topics and groups.
async fn drain_lanes(
    args: &BenchCpuArgs,
    settings: &Settings,
    broker: u32,
    redis: u32,
) -> anyhow::Result<serde_json::Value> {
    let mut s = unique(settings, "cpu");
    let free_port = || -> anyhow::Result<u16> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?.port())
    };
    let ports = &mut s.admin.ports;
    for port in [
        &mut ports.up,
        &mut ports.ingest,
        &mut ports.micro_batcher,
        &mut ports.scorer,
        &mut ports.cache_writer,
        &mut ports.fallback_responder,
    ] {
        *port = free_port()?;
    }
    // Requests wait in the topic while the services are stopped; none may expire.
    s.fallback_responder.max_request_age_ms = 0;
    lanes_common::kafka::ensure_topics(&s.kafka, &s.topics.all()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("lanes.toml");
    std::fs::write(&config, toml::to_string(&s)?)?;

    let exe = std::env::current_exe()?;
    let spawn = |program: &std::path::Path, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .env(lanes_common::config::CONFIG_FILE_ENV, &config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    };
    let ports = &s.admin.ports;
    let mut procs = Vec::new();
    if args.per_service {
        for (name, port, goal) in [
            ("ingest", ports.ingest, GOAL_RSS_PLAIN_MIB),
            ("micro-batcher", ports.micro_batcher, GOAL_RSS_PLAIN_MIB),
            ("scorer", ports.scorer, GOAL_RSS_MODEL_MIB),
            ("cache-writer", ports.cache_writer, GOAL_RSS_PLAIN_MIB),
            (
                "fallback-responder",
                ports.fallback_responder,
                GOAL_RSS_MODEL_MIB,
            ),
        ] {
            let bin = exe.with_file_name(format!("lanes-{name}"));
            anyhow::ensure!(
                bin.is_file(),
                "{} not built: run `cargo build --release --bins`",
                bin.display()
            );
            match spawn(&bin, &[]) {
                Ok(child) => procs.push(Proc {
                    name,
                    child,
                    admin_port: port,
                    goal_rss_mib: goal,
                }),
                Err(e) => {
                    stop_all(&mut procs);
                    return Err(e);
                }
            }
        }
    } else {
        procs.push(Proc {
            name: "lanes up",
            child: spawn(&exe, &["up"])?,
            admin_port: ports.up,
            goal_rss_mib: GOAL_RSS_UP_MIB,
        });
    }
    let result = measure(args, &s, &procs, broker, redis).await;
    stop_all(&mut procs);
    let footprint = footprint_then_forget_keys(&s).await?;
    let mut result = result?;
    result["redis_cache"] = footprint;
    Ok(result)
}

/// Resumes and stops every process of a drain, and waits for each.
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = process::signal(p.pid(), "CONT");
        let _ = process::signal(p.pid(), "TERM");
    }
    for p in procs.iter_mut() {
        let _ = p.child.wait();
    }
}

/// Publishes `n` generated raw events to `topic` and waits for every acknowledgement.
async fn publish(s: &Settings, topic: &str, n: usize, entities: usize) -> anyhow::Result<()> {
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let mut pending = Vec::with_capacity(n);
    for (_, line) in events(now_seed(), n, entities, Sample::raw_json) {
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
    publish(&s, &s.topics.raw, args.events, args.entities).await?;
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

/// The sum of the samples of metric family `family` at `metrics` (0 before any).
async fn metric_sum(http: &reqwest::Client, metrics: &str, family: &str) -> anyhow::Result<f64> {
    let text = http.get(metrics).send().await?.text().await?;
    Ok(crate::ops::sum_samples(&text, family).unwrap_or(0.0))
}

/// Publishes `n` prediction requests with features (entities of the generator's cards)
/// to the requests topic and waits for every acknowledgement.
async fn publish_requests(s: &Settings, n: usize, entities: usize) -> anyhow::Result<()> {
    use lanes_common::records::{PredictionRequest, now_millis};
    let codec = lanes_common::avro::AvroCodec::new(&s.registry)?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let mut pending = Vec::with_capacity(n);
    for (i, sample) in lanes_common::generator::Generator::new(now_seed(), entities)
        .take(n)
        .enumerate()
    {
        let req = PredictionRequest {
            request_id: format!("bench-cpu-{i}"),
            entity_id: sample.entity_id.clone(),
            features: Some(sample.feature_map()),
            max_age_ms: None,
            reply_topic: None,
            requested_at: now_millis(),
            stale_while_refresh: None,
        };
        let payload = codec.encode(&s.topics.requests, &req).await?;
        pending.push(
            enqueue(
                &producer,
                FutureRecord::to(&s.topics.requests)
                    .key(&req.entity_id)
                    .payload(&payload),
            )
            .await?,
        );
    }
    for d in pending {
        delivered(d).await?;
    }
    Ok(())
}

async fn measure(
    args: &BenchCpuArgs,
    s: &Settings,
    procs: &[Proc],
    broker: u32,
    redis: u32,
) -> anyhow::Result<serde_json::Value> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in procs {
        let ready = format!("http://127.0.0.1:{}/readyz", p.admin_port);
        while !http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not ready within 60 s",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Let the consumers settle into their groups before they are stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in procs {
        process::signal(p.pid(), "STOP")?;
    }
    publish(s, &s.topics.raw, args.events, args.entities).await?;
    let responder = procs.iter().find(|p| p.name == "fallback-responder");
    let requests = if responder.is_some() {
        args.requests
    } else {
        0
    };
    if requests > 0 {
        publish_requests(s, requests, args.entities).await?;
    }
    let cpu = |pid| cpu_seconds(pid);
    let before: Vec<f64> = procs
        .iter()
        .map(|p| cpu(p.pid()))
        .collect::<Result<_, _>>()?;
    let commands = redis_commands(s).await?;
    let outside = [cpu(broker)?, cpu(redis)?];
    let started = Instant::now();
    for p in procs {
        process::signal(p.pid(), "CONT")?;
    }
    let port_of = |name: &str| {
        procs
            .iter()
            .find(|p| p.name == name)
            .or(procs.first())
            .map_or(0, |p| p.admin_port)
    };
    let writer = format!("http://127.0.0.1:{}/metrics", port_of("cache-writer"));
    let answers = format!("http://127.0.0.1:{}/metrics", port_of("fallback-responder"));
    let deadline = Instant::now() + Duration::from_secs(300);
    // Predictions of the drained events only: the responder's real-time scores reach
    // the cache-writer too, without an ingestion time.
    while metric_sum(
        &http,
        &writer,
        "lanes_cache_writer_ingest_to_cache_seconds_count",
    )
    .await?
        < args.events as f64
        || (requests > 0
            && metric_sum(&http, &answers, "lanes_fallback_responder_responses_total").await?
                < requests as f64)
    {
        anyhow::ensure!(Instant::now() < deadline, "not drained within 300 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain = started.elapsed().as_secs_f64();
    let after: Vec<f64> = procs
        .iter()
        .map(|p| cpu(p.pid()))
        .collect::<Result<_, _>>()?;
    let outside_after = [cpu(broker)?, cpu(redis)?];
    let commands_after = redis_commands(s).await?;
    let peaks: Vec<Option<f64>> = procs
        .iter()
        .map(|p| process::peak_rss_mib(p.pid()))
        .collect();
    let streaming = |v: &[f64]| -> f64 {
        procs
            .iter()
            .zip(v)
            .filter(|(p, _)| p.name != "fallback-responder")
            .map(|(_, c)| c)
            .sum()
    };
    let idle_percent = if args.idle_secs > 0 {
        // Let the last commits and window closes pass first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let total = || -> anyhow::Result<f64> {
            procs
                .iter()
                .map(|p| cpu(p.pid()))
                .sum::<anyhow::Result<f64>>()
        };
        let (cpu, at) = (total()?, Instant::now());
        tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
        Some((total()? - cpu) * 100.0 / at.elapsed().as_secs_f64())
    } else {
        None
    };
    let n = args.events as f64;
    let services: Vec<serde_json::Value> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let handled = if p.name == "fallback-responder" {
                requests as f64
            } else {
                n
            };
            json!({
                "service": p.name,
                "cpu_us_per_item": (after[i] - before[i]) * 1e6 / handled,
                "peak_rss_mib": peaks[i],
                "goal_peak_rss_mib": p.goal_rss_mib,
            })
        })
        .collect();
    Ok(json!({
        "events": args.events,
        "requests": requests,
        "drain_s": drain,
        "events_per_s": n / drain,
        "cpu_us_per_event": {
            "lanes": (streaming(&after) - streaming(&before)) * 1e6 / n,
            "broker": (outside_after[0] - outside[0]) * 1e6 / n,
            "redis": (outside_after[1] - outside[1]) * 1e6 / n,
        },
        "redis_per_event": redis_per_event(&commands, &commands_after, n),
        "goal_us_per_event": {"lanes": GOAL_LANES_US, "redis": GOAL_REDIS_US},
        "services": services,
        "lanes_peak_rss_mib": if args.per_service { None } else { peaks[0] },
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

#[cfg(test)]
mod tests {
    use super::{median, parse_commandstats, redis_per_event};

    #[test]
    fn median_of_odd_even_and_no_drains() {
        assert_eq!(median(vec![19.0, 15.0, 24.0]), 19.0);
        assert_eq!(median(vec![24.0, 15.0, 19.0, 16.0]), 17.5);
        assert_eq!(median(vec![15.2]), 15.2);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn redis_time_splits_into_commands_and_the_scripts_own_work() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=2,usec=100,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_hget:calls=10,usec=10,usec_per_call=1.00\r\ncmdstat_memory|usage:calls=1,usec=3,usec_per_call=3.00\r\n",
        );
        assert_eq!(before["evalsha"], (2.0, 100.0));
        assert_eq!(before["memory|usage"], (1.0, 3.0));
        let after = parse_commandstats(
            "cmdstat_evalsha:calls=4,usec=1100,usec_per_call=275.00\n\
             cmdstat_hget:calls=110,usec=210,usec_per_call=1.91\ncmdstat_hset:calls=50,usec=300,usec_per_call=6.00\n",
        );
        let r = redis_per_event(&before, &after, 100.0);
        assert_eq!(r["script_calls"], 0.02);
        assert_eq!(r["calls"]["hget"], 1.0);
        assert_eq!(r["calls"]["hset"], 0.5);
        assert_eq!(r["calls"]["hmget"], 0.0);
        assert_eq!(r["us_in_commands"], 5.0);
        assert_eq!(r["us_in_scripts_own_work"], 5.0);
    }
}
