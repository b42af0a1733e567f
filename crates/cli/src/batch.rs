//! `lanes generate` writes an entity snapshot; `lanes batch` scores one into the cache,
//! once or on a schedule.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use lanes_batch::snapshot::{Format, parse_time};
use lanes_batch::{Job, Schedule};
use lanes_common::Settings;
use lanes_common::admin;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// How many entities (rows): card-0, card-1, ...
    #[arg(long)]
    entities: usize,
    /// The file to write; .csv or .parquet.
    #[arg(long)]
    out: PathBuf,
    /// Overrides the format the extension names.
    #[arg(long, value_enum)]
    format: Option<Format>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// When the features were true (RFC 3339 or epoch ms), written as every row's
    /// event_time; default now.
    #[arg(long)]
    as_of: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// The entity snapshot to score (.csv or .parquet): entity_id, event_time and the
    /// model's features as columns.
    input: PathBuf,
    /// Overrides the format the extension names.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Rows per tensor and per published chunk (default: batch.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// One event time (RFC 3339 or epoch ms) for every row, for snapshots without an
    /// event_time column.
    #[arg(long)]
    as_of: Option<String>,
    /// Also write the scored rows to this file (.parquet or .csv).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Read, check and score, but publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run on a schedule until stopped: a duration (30m, 1h; first run at once) or a
    /// cron expression in UTC ("0 2 * * *").
    #[arg(long)]
    every: Option<String>,
}

fn time_arg(flag: &str, value: Option<&str>) -> anyhow::Result<Option<i64>> {
    value
        .map(|v| parse_time(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
        .transpose()
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let format = match args.format {
        Some(f) => f,
        None => Format::of(&args.out)?,
    };
    let as_of =
        time_arg("as-of", args.as_of.as_deref())?.unwrap_or_else(lanes_common::records::now_millis);
    lanes_batch::job::generate(&args.out, format, args.entities, args.seed, as_of)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(out = %args.out.display(), entities = args.entities, as_of, "snapshot written");
    Ok(())
}

pub async fn run(args: BatchArgs, settings: &Settings) -> anyhow::Result<()> {
    let job = Job {
        input: args.input,
        format: args.format,
        batch_size: args.batch_size.unwrap_or(settings.batch.batch_size).max(1),
        as_of: time_arg("as-of", args.as_of.as_deref())?,
        out: args.out,
        publish: !args.dry_run,
    };
    let schedule = args
        .every
        .as_deref()
        .map(str::parse::<Schedule>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let interactive = std::io::stderr().is_terminal();
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            lanes_common::shutdown::signal().await;
            tracing::info!("stopping");
            stop.cancel();
        }
    });
    match schedule {
        None => {
            let report = lanes_batch::job::run(settings, &job, interactive, &stop).await?;
            eprintln!(
                "scored {} rows with {} v{} in {:.1} s ({:.0} rows/s, {:.1} s in the model){}",
                report.rows,
                report.model_name,
                report.model_version,
                report.elapsed.as_secs_f64(),
                report.rows_per_second(),
                report.scoring.as_secs_f64(),
                if job.publish {
                    ""
                } else {
                    "; dry run, nothing published"
                }
            );
            Ok(())
        }
        Some(schedule) => {
            // A long-running schedule is watched like a service: /metrics, /healthz.
            let registry = prometheus::Registry::new();
            let metrics = lanes_batch::BatchMetrics::new(&registry)?;
            let port = settings.admin.ports.batch;
            let listener = admin::bind(&settings.admin.host, port)
                .await
                .with_context(|| format!("binding the admin port {port}"))?;
            let ready = admin::ReadyFlag::new("batch");
            ready.set(true);
            let app = admin::router(registry, vec![Box::new(ready)]);
            tokio::spawn(admin::serve(listener, app, stop.clone()));
            let (ok, failed) =
                lanes_batch::run_scheduled(settings, &job, &schedule, interactive, &metrics, &stop)
                    .await;
            tracing::info!(ok, failed, "scheduled batch runs stopped");
            Ok(())
        }
    }
}
