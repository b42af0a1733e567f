//! The responder's metrics, `lanes_fallback_responder_*`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_common::config::FallbackResponderConfig;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use tokio::time::Instant;

use crate::hits::HitWindow;

#[derive(Clone)]
pub struct Metrics {
    /// fresh_hit, stale_hit, miss, realtime, not_found, stale_served, error.
    pub outcomes: IntCounterVec,
    pub responses: IntCounterVec,
    pub cache_age: Histogram,
    pub scorings: IntCounter,
    pub scoring_seconds: Histogram,
    pub deadline_misses: IntCounter,
    pub redis_errors: IntCounter,
    pub breaker_state: IntGauge,
    pub refreshes: IntCounterVec,
    pub stale_share: Gauge,
    pub sampled: IntGauge,
    pub response_seconds: Histogram,
    pub dead_letters: IntCounterVec,
    pub refused: IntCounterVec,
    pub background: IntGauge,
    /// Requests that read the cache, by result: fresh, miss, stale_age, stale_version,
    /// stale_features, unavailable (the cache could not be read).
    pub lookups: IntCounterVec,
    pub hit_ratio: Gauge,
    pub hit_ratio_floor: Gauge,
    pub serving_share: Gauge,
    pub grace_answers: IntCounter,
    hits: Arc<Mutex<HitWindow>>,
}

/// The results a lookup counts under.
pub const LOOKUP_RESULTS: [&str; 6] = [
    "fresh",
    "miss",
    "stale_age",
    "stale_version",
    "stale_features",
    "unavailable",
];

const NS: &str = "lanes_fallback_responder";

impl Metrics {
    pub fn new(r: &Registry, cfg: &FallbackResponderConfig) -> anyhow::Result<Self> {
        let name = |n: &str| format!("{NS}_{n}");
        let m = Self {
            outcomes: IntCounterVec::new(
                Opts::new(
                    name("outcomes_total"),
                    "Requests by outcome: fresh_hit, stale_hit, miss, realtime, not_found, stale_served, error.",
                ),
                &["outcome"],
            )?,
            responses: IntCounterVec::new(
                Opts::new(name("responses_total"), "Responses by source and status."),
                &["source", "status"],
            )?,
            cache_age: Histogram::with_opts(
                HistogramOpts::new(
                    name("cache_age_seconds"),
                    "Age of cached predictions when read.",
                )
                .buckets(prometheus::exponential_buckets(0.1, 3.0, 12)?),
            )?,
            scorings: IntCounter::new(
                name("scorings_total"),
                "Real-time model runs (after coalescing).",
            )?,
            scoring_seconds: Histogram::with_opts(
                HistogramOpts::new(name("scoring_seconds"), "Real-time model run time.")
                    .buckets(prometheus::exponential_buckets(0.000_02, 2.0, 16)?),
            )?,
            deadline_misses: IntCounter::new(
                name("deadline_misses_total"),
                "Real-time scorings that missed the deadline.",
            )?,
            redis_errors: IntCounter::new(
                name("redis_errors_total"),
                "Failed or timed-out cache reads.",
            )?,
            breaker_state: IntGauge::new(
                name("cache_breaker_state"),
                "Cache circuit breaker: 0 closed, 1 open, 2 half-open.",
            )?,
            refreshes: IntCounterVec::new(
                Opts::new(
                    name("refreshes_total"),
                    "Background re-scores of old entries, by trigger (read: a fresh entry past refresh_after_ms was read, stale: a stale entry was answered under stale-while-refresh, sweep; skipped: no room under max_in_flight).",
                ),
                &["trigger"],
            )?,
            stale_share: Gauge::new(
                name("stale_share"),
                "Share of sampled cached predictions older than the freshness bound or from another model version.",
            )?,
            sampled: IntGauge::new(
                name("stale_sampled_entries"),
                "Cached predictions in the last staleness sample.",
            )?,
            response_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    name("response_seconds"),
                    "From a request read to its response handed to the producer.",
                )
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16)?),
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    name("dead_letters_total"),
                    "Requests dead-lettered, by error class.",
                ),
                &["class"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    name("refused_total"),
                    "Requests answered ERROR without an answer, by reason (entity_id: empty, requested_at: a clock far off, expired: older than max_request_age_ms when read, no_slot: could not start in time for max_request_age_ms, reply_topic: not allowed, not a topic name, not on the broker or refusing writes).",
                ),
                &["reason"],
            )?,
            background: IntGauge::new(
                name("background_tasks"),
                "Scorings and cache warmings running beside the requests; with them, at most max_in_flight.",
            )?,
            lookups: IntCounterVec::new(
                Opts::new(
                    name("cache_lookups_total"),
                    "Requests that read the cache, by result: fresh (answered from the cache), miss, stale_age, stale_version, stale_features, unavailable (the cache could not be read).",
                ),
                &["result"],
            )?,
            hit_ratio: Gauge::new(
                name("hit_ratio"),
                "Share of cache lookups answered from a fresh entry over the last hit_ratio_window_s seconds; NaN when there were none.",
            )?,
            hit_ratio_floor: Gauge::new(
                name("hit_ratio_floor"),
                "The configured hit_ratio_floor: LanesCacheHitRatioLow fires while the hit ratio stays under it.",
            )?,
            serving_share: Gauge::new(
                name("serving_version_share"),
                "Share of sampled cached predictions scored by the model version now serving.",
            )?,
            grace_answers: IntCounter::new(
                name("grace_answers_total"),
                "Fresh answers from entries of the previous model version, within rollout_grace_ms of a switch.",
            )?,
            hits: Arc::new(Mutex::new(HitWindow::new(
                Duration::from_secs(cfg.hit_ratio_window_s),
                Instant::now(),
            ))),
        };
        m.hit_ratio.set(f64::NAN);
        m.hit_ratio_floor.set(cfg.hit_ratio_floor);
        lanes_common::metrics::zeroed(&m.lookups, &LOOKUP_RESULTS);
        lanes_common::metrics::zeroed(
            &m.refused,
            &[
                "entity_id",
                "request_id",
                "requested_at",
                "expired",
                "no_slot",
                "reply_topic",
                "features",
            ],
        );
        let outcomes = [
            "fresh_hit",
            "stale_hit",
            "miss",
            "realtime",
            "not_found",
            "stale_served",
            "error",
        ];
        lanes_common::metrics::zeroed(&m.outcomes, &outcomes);
        lanes_common::metrics::zeroed(&m.refreshes, &["read", "stale", "sweep", "skipped"]);
        for (source, status) in [
            ("CACHE", "OK"),
            ("REALTIME", "OK"),
            ("STALE_CACHE", "OK"),
            ("NONE", "NOT_FOUND"),
            ("NONE", "ERROR"),
        ] {
            m.responses.with_label_values(&[source, status]);
        }
        r.register(Box::new(m.outcomes.clone()))?;
        r.register(Box::new(m.responses.clone()))?;
        r.register(Box::new(m.cache_age.clone()))?;
        r.register(Box::new(m.scorings.clone()))?;
        r.register(Box::new(m.scoring_seconds.clone()))?;
        r.register(Box::new(m.deadline_misses.clone()))?;
        r.register(Box::new(m.redis_errors.clone()))?;
        r.register(Box::new(m.breaker_state.clone()))?;
        r.register(Box::new(m.refreshes.clone()))?;
        r.register(Box::new(m.stale_share.clone()))?;
        r.register(Box::new(m.sampled.clone()))?;
        r.register(Box::new(m.response_seconds.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        r.register(Box::new(m.refused.clone()))?;
        r.register(Box::new(m.background.clone()))?;
        r.register(Box::new(m.lookups.clone()))?;
        r.register(Box::new(m.hit_ratio.clone()))?;
        r.register(Box::new(m.hit_ratio_floor.clone()))?;
        r.register(Box::new(m.serving_share.clone()))?;
        r.register(Box::new(m.grace_answers.clone()))?;
        Ok(m)
    }

    /// Counts one cache lookup under `result` (one of [`LOOKUP_RESULTS`]) and moves the
    /// hit ratio.
    pub fn lookup(&self, result: &str) {
        self.lookups.with_label_values(&[result]).inc();
        let mut hits = self.hits.lock().expect("hit window");
        let now = Instant::now();
        hits.record(now, result == "fresh");
        self.hit_ratio.set(hits.ratio(now).unwrap_or(f64::NAN));
    }

    /// Ages the hit ratio's window when no lookup does.
    pub fn age_hit_ratio(&self) {
        let ratio = self.hits.lock().expect("hit window").ratio(Instant::now());
        self.hit_ratio.set(ratio.unwrap_or(f64::NAN));
    }

    pub fn outcome(&self, outcome: &str) {
        self.outcomes.with_label_values(&[outcome]).inc();
    }
}
