//! The responder's metrics, `lanes_fallback_responder_*`.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

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
}

const NS: &str = "lanes_fallback_responder";

impl Metrics {
    pub fn new(r: &Registry) -> anyhow::Result<Self> {
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
                    "Background re-scores of old entries, by trigger (read, sweep; skipped: no room under max_in_flight).",
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
                    "Requests answered ERROR without an answer, by reason (requested_at: a clock far off, expired: older than max_request_age_ms when read, no_slot: could not start in time for max_request_age_ms, reply_topic: not allowed or refusing writes).",
                ),
                &["reason"],
            )?,
            background: IntGauge::new(
                name("background_tasks"),
                "Scorings and cache warmings running beside the requests; with them, at most max_in_flight.",
            )?,
        };
        lanes_common::metrics::zeroed(
            &m.refused,
            &["requested_at", "expired", "no_slot", "reply_topic"],
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
        lanes_common::metrics::zeroed(&m.refreshes, &["read", "sweep", "skipped"]);
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
        Ok(m)
    }

    pub fn outcome(&self, outcome: &str) {
        self.outcomes.with_label_values(&[outcome]).inc();
    }
}
