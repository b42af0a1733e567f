//! The batch lane: score entity snapshots (CSV or Parquet) with the served model and
//! fill the prediction cache ahead of time, once or on a schedule.
//!
//! [`snapshot`] reads and checks files, [`job`] scores and publishes one run,
//! [`schedule`] says when the next run starts, and [`run_scheduled`] loops them.

pub mod job;
mod progress;
pub mod schedule;
pub mod snapshot;

use lanes_common::Settings;
use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

pub use job::{Job, Report};
pub use schedule::Schedule;

/// What a scheduled batch job exports on its admin port.
#[derive(Clone)]
pub struct BatchMetrics {
    runs: IntCounterVec,
    rows: IntCounter,
    last_success: Gauge,
    last_seconds: Gauge,
}

impl BatchMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            runs: IntCounterVec::new(
                Opts::new(
                    "lanes_batch_runs_total",
                    "Batch runs, by outcome (ok, failed).",
                ),
                &["outcome"],
            )?,
            rows: IntCounter::new(
                "lanes_batch_rows_total",
                "Rows scored and published by batch runs.",
            )?,
            last_success: Gauge::new(
                "lanes_batch_last_success_timestamp_seconds",
                "When the last successful batch run finished (Unix time).",
            )?,
            last_seconds: Gauge::new(
                "lanes_batch_last_run_seconds",
                "How long the last successful batch run took.",
            )?,
        };
        lanes_common::metrics::zeroed(&m.runs, &["ok", "failed"]);
        r.register(Box::new(m.runs.clone()))?;
        r.register(Box::new(m.rows.clone()))?;
        r.register(Box::new(m.last_success.clone()))?;
        r.register(Box::new(m.last_seconds.clone()))?;
        Ok(m)
    }

    fn record(&self, result: &anyhow::Result<Report>) {
        match result {
            Ok(r) => {
                self.runs.with_label_values(&["ok"]).inc();
                self.rows.inc_by(r.rows);
                self.last_success
                    .set(lanes_common::records::now_millis() as f64 / 1000.0);
                self.last_seconds.set(r.elapsed.as_secs_f64());
            }
            Err(_) => self.runs.with_label_values(&["failed"]).inc(),
        }
    }
}

/// Runs `job` on `schedule` until `stop`. A failed run is logged and the schedule goes
/// on (the next snapshot may be fine); the counts come back when it stops.
pub async fn run_scheduled(
    settings: &Settings,
    job: &Job,
    schedule: &Schedule,
    interactive: bool,
    metrics: &BatchMetrics,
    stop: &CancellationToken,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut last = None;
    loop {
        let now = chrono::Utc::now();
        let Some(next) = schedule.next(last, now) else {
            tracing::warn!("the schedule has no further runs");
            return (ok, failed);
        };
        let wait = (next - now).to_std().unwrap_or_default();
        if !wait.is_zero() {
            tracing::info!(next = %next.to_rfc3339(), "next batch run");
        }
        tokio::select! {
            _ = stop.cancelled() => return (ok, failed),
            _ = tokio::time::sleep(wait) => {}
        }
        last = Some(chrono::Utc::now());
        let result = job::run(settings, job, interactive, stop).await;
        if stop.is_cancelled() && result.is_err() {
            tracing::info!("batch run interrupted by the stop; the next start runs it again");
            return (ok, failed);
        }
        metrics.record(&result);
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                tracing::error!(
                    error = format!("{e:#}"),
                    "batch run failed; waiting for the next one"
                );
            }
        }
        if stop.is_cancelled() {
            return (ok, failed);
        }
    }
}
