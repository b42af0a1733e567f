//! Progress of a batch run: a bar with rows/s and ETA on a terminal, a log line every
//! few seconds otherwise (CI, cron, Kubernetes), so both people and log pipelines can
//! follow a long run.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Log lines this far apart when not on a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: Option<u64>, interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows, {per_sec}, ETA {eta}"
            } else {
                "{spinner} [{elapsed_precise}] {human_pos} rows, {per_sec}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            total,
            done: 0,
            started: now,
            last_line: now,
        }
    }

    pub fn advance(&mut self, rows: u64) {
        self.done += rows;
        match &self.bar {
            Some(bar) => bar.inc(rows),
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                self.line();
            }
            None => {}
        }
    }

    fn line(&self) {
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match self.total {
            Some(total) => {
                let eta = eta(self.done, total, rate);
                tracing::info!(
                    rows = self.done,
                    total,
                    percent = (100 * self.done).checked_div(total).unwrap_or(100),
                    rows_per_second = rate as u64,
                    eta_seconds = eta.as_secs(),
                    "batch progress"
                );
            }
            None => tracing::info!(
                rows = self.done,
                rows_per_second = rate as u64,
                "batch progress"
            ),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Time left at `rate` rows per second.
pub fn eta(done: u64, total: u64, rate: f64) -> Duration {
    if rate <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_rows_left_over_rate() {
        assert_eq!(eta(250, 1000, 250.0), Duration::from_secs(3));
        assert_eq!(eta(1000, 1000, 250.0), Duration::ZERO);
        assert_eq!(eta(0, 1000, 0.0), Duration::ZERO);
    }
}
