//! The cache-writer metrics, named `lanes_cache_writer_<what>_<unit>`, registered once per
//! process registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) writes: IntCounterVec,
    pub(crate) feature_writes: IntCounterVec,
    pub(crate) redis_errors: IntCounter,
    pub(crate) pipeline_seconds: Histogram,
    pub(crate) ingest_to_cache: Histogram,
    pub(crate) dead_letters: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            writes: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_writes_total",
                    "Predictions applied to Redis, by result (written, stale: the cache held a newer one, duplicate: it held this one).",
                ),
                &["result"],
            )?,
            feature_writes: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_feature_writes_total",
                    "Online features applied to Redis, by result (written, stale: the cache held newer ones, superseded: a newer event of the entity came in the same pipeline and was written in its place).",
                ),
                &["result"],
            )?,
            redis_errors: IntCounter::new(
                "lanes_cache_writer_redis_errors_total",
                "Failed Redis pipelines (retried).",
            )?,
            pipeline_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_cache_writer_pipeline_seconds",
                    "Redis round trip per pipeline.",
                )
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16)?),
            )?,
            ingest_to_cache: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_cache_writer_ingest_to_cache_seconds",
                    "From ingestion of the event to its prediction landing in Redis.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_dead_letters_total",
                    "Predictions dead-lettered, by error class.",
                ),
                &["class"],
            )?,
        };
        lanes_common::metrics::zeroed(&m.writes, &["written", "stale", "duplicate"]);
        lanes_common::metrics::zeroed(&m.feature_writes, &["written", "stale", "superseded"]);
        r.register(Box::new(m.writes.clone()))?;
        r.register(Box::new(m.feature_writes.clone()))?;
        r.register(Box::new(m.redis_errors.clone()))?;
        r.register(Box::new(m.pipeline_seconds.clone()))?;
        r.register(Box::new(m.ingest_to_cache.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}
