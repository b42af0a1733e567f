//! The micro-batcher metrics, named `lanes_micro_batcher_<what>_<unit>`, registered once per
//! process registry.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub(crate) struct Metrics {
    pub(crate) events: IntCounterVec,
    pub(crate) batch_size: Histogram,
    pub(crate) batch_bytes: Histogram,
    pub(crate) closed: IntCounterVec,
    pub(crate) open_seconds: Histogram,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) window_delay: Gauge,
    pub(crate) window_size: IntGauge,
}

impl Metrics {
    pub(crate) fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            events: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_events_total",
                    "Events read, by outcome (batched, dead_letter).",
                ),
                &["outcome"],
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_batch_size_events",
                    "Events per emitted batch.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ]),
            )?,
            batch_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_batch_size_bytes",
                    "Encoded size of emitted batches.",
                )
                .buckets(prometheus::exponential_buckets(256.0, 4.0, 8)?),
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_windows_closed_total",
                    "Windows closed, by reason (COUNT, BYTES, DELAY, FLUSH, PRIORITY).",
                ),
                &["reason"],
            )?,
            open_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_window_open_seconds",
                    "How long a window stayed open.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_dead_letters_total",
                    "Events dead-lettered, by error class.",
                ),
                &["class"],
            )?,
            window_delay: Gauge::new(
                "lanes_micro_batcher_window_delay_seconds",
                "How long a window may stay open now (max_delay_ms, or what target_latency_ms leaves).",
            )?,
            window_size: IntGauge::new(
                "lanes_micro_batcher_window_size_events",
                "Events a window gathers at most now, on its busiest partition (max_events, or what the rate fills within the delay).",
            )?,
        };
        lanes_common::metrics::zeroed(&m.events, &["batched", "dead_letter"]);
        lanes_common::metrics::zeroed(&m.closed, &["COUNT", "BYTES", "DELAY", "FLUSH", "PRIORITY"]);
        r.register(Box::new(m.events.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.batch_bytes.clone()))?;
        r.register(Box::new(m.closed.clone()))?;
        r.register(Box::new(m.open_seconds.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        r.register(Box::new(m.window_delay.clone()))?;
        r.register(Box::new(m.window_size.clone()))?;
        Ok(m)
    }
}
