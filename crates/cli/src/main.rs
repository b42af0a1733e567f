//! `lanes`: the operator CLI. Subcommands talk to the configured broker and registry;
//! `lanes up` runs every service in one process.

// Printing results to stdout is what a CLI is for.
#![allow(clippy::print_stdout)]

mod batch;
mod bench;
mod bench_batch;
mod bench_cpu;
mod bench_plot;
mod bench_serving;
mod bench_window;
mod demo;
mod ops;
mod publish;
mod up;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lanes_common::generator::{FEATURES, Generator};
use lanes_common::shutdown::EXIT_CONFIG;
use lanes_common::{Settings, telemetry};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[derive(Debug, Parser)]
#[command(
    name = "lanes",
    version,
    about = "Operate Lanes: topics, sample traffic, and every service in one process"
)]
struct Cli {
    /// Config file layered over the defaults (else $LANES_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write generated card transactions with their fraud label (training data).
    Sample {
        /// How many events.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// How many distinct cards (entities).
        #[arg(long, default_value_t = 1000)]
        cards: usize,
        /// `csv` (features then `fraud`) or `jsonl` (raw events as publishers write them).
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Write an entity feature snapshot (CSV or Parquet) from the generator: one row
    /// per entity, for `lanes batch`.
    Generate(batch::GenerateArgs),
    /// Score an entity snapshot with the served model and publish BATCH predictions,
    /// which the cache-writer puts in the cache; once or on a schedule.
    Batch(batch::BatchArgs),
    /// Measure the batch job's rows/s against raw ONNX Runtime at the same batch size
    /// (build with --release).
    BenchBatch(bench_batch::BenchBatchArgs),
    /// Print records of a topic as JSON lines (Avro decoded through the registry).
    Tail(ops::TailArgs),
    /// Inspect the prediction cache.
    Cache {
        #[command(subcommand)]
        action: ops::CacheAction,
    },
    /// List dead letters, or replay them to their source topic after a fix.
    Dlq {
        #[command(subcommand)]
        action: ops::DlqAction,
    },
    /// Health, lag and staleness of every service (exit code 3 if any is down or not ready).
    Status,
    /// Manage the Lanes topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Publish raw JSON events to the raw topic: generated ones or a JSON-lines file.
    Publish(publish::PublishArgs),
    /// Sweep window settings and offered rates on your model and events: throughput,
    /// p99 latency and batch size, drawn to SVG, with the window recommended for a
    /// latency target; beside the raw broker rates (build with --release).
    Bench(bench::BenchArgs),
    /// Measure the CPU time per event of `lanes up` (or of each service as its own
    /// process, with peak memory) draining a backlog, beside the broker's and Redis's on
    /// the same drain (build with --release).
    BenchCpu(bench_cpu::BenchCpuArgs),
    /// Measure request -> response latency through the fallback-responder (fresh hits,
    /// misses with features) beside the broker's raw round trip.
    BenchServing(bench_serving::ServingArgs),
    /// Compare fixed and adaptive micro-batch windows on simulated traffic across a rate
    /// sweep: p99 event-to-batch latency and batch size against a latency target.
    BenchWindow(bench_window::BenchWindowArgs),
    /// Publish sample traffic (some invalid) to a running lane, wait until every event
    /// is accounted for, and print a summary.
    Demo(demo::DemoArgs),
    /// Run every service (ingest, micro-batcher, scorer, cache-writer) in this process,
    /// with one admin server for all of them on admin.ports.up.
    Up,
}

#[derive(Debug, Subcommand)]
enum TopicsAction {
    /// Create every Lanes topic that is missing.
    Create,
    /// List topics with their partition counts.
    List,
}

#[tokio::main]
async fn main() {
    lanes_common::tune_allocator();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lanes: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Err(e) = telemetry::init(&settings.log) {
        eprintln!("lanes: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    lanes_common::failpoint::setup();
    if let Err(e) = run(cli.command, settings).await {
        eprintln!("lanes: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Sample {
            count,
            seed,
            cards,
            format,
        } => sample(count, seed, cards, &format),
        Command::Topics {
            action: TopicsAction::Create,
        } => {
            let created =
                lanes_common::kafka::ensure_topics(&settings.kafka, &settings.topics.all())
                    .await
                    .context("creating topics")?;
            let mut out = std::io::stdout().lock();
            for t in settings.topics.all() {
                let state = if created.iter().any(|c| c == t) {
                    "created"
                } else {
                    "exists"
                };
                writeln!(out, "{t}\t{state}")?;
            }
            Ok(())
        }
        Command::Topics {
            action: TopicsAction::List,
        } => {
            let mut cfg = rdkafka::ClientConfig::new();
            cfg.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
            for (k, v) in &settings.kafka.properties {
                cfg.set(k, v);
            }
            let consumer: BaseConsumer = cfg.create()?;
            let md = tokio::task::spawn_blocking(move || {
                consumer.fetch_metadata(None, Duration::from_secs(10))
            })
            .await?
            .context("fetching metadata")?;
            let mut out = std::io::stdout().lock();
            let mut topics: Vec<_> = md
                .topics()
                .iter()
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect();
            topics.sort();
            for (name, partitions) in topics {
                writeln!(out, "{name}\t{partitions}")?;
            }
            Ok(())
        }
        Command::Publish(args) => publish::run(args, &settings).await,
        Command::Generate(args) => batch::generate(args),
        Command::Batch(args) => batch::run(args, &settings).await,
        Command::BenchBatch(args) => bench_batch::run(args, &settings).await,
        Command::Demo(args) => demo::run(args, &settings).await,
        Command::Tail(args) => ops::tail(args, &settings).await,
        Command::Cache { action } => ops::cache(action, &settings).await,
        Command::Dlq { action } => ops::dlq_cmd(action, &settings).await,
        Command::Status => {
            let code = ops::status(&settings).await?;
            std::process::exit(code);
        }
        Command::Bench(args) => bench::run(args, &settings).await,
        Command::BenchCpu(args) => bench_cpu::run(args, &settings).await,
        Command::BenchWindow(args) => bench_window::run(args),
        Command::BenchServing(args) => bench_serving::run(args, &settings).await,
        Command::Up => {
            let code = up::run(settings).await;
            std::process::exit(code);
        }
    }
}

fn sample(count: usize, seed: u64, cards: usize, format: &str) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let generator = Generator::new(seed, cards).take(count);
    match format {
        "csv" => {
            writeln!(out, "{},fraud", FEATURES.join(","))?;
            for s in generator {
                let row: Vec<String> = s.features.iter().map(|v| v.to_string()).collect();
                writeln!(out, "{},{}", row.join(","), s.fraud as u8)?;
            }
        }
        "jsonl" => {
            for s in generator {
                writeln!(out, "{}", s.raw_json())?;
            }
        }
        other => anyhow::bail!("--format must be csv or jsonl, got {other:?}"),
    }
    out.flush()?;
    Ok(())
}
