//! The scorer metrics, named `lanes_scorer_<what>_<unit>`, registered once per
//! process registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub(crate) struct Metrics {
    pub(crate) inference: HistogramVec,
    pub(crate) rows: IntCounter,
    pub(crate) batches: IntCounterVec,
    pub(crate) shadow: IntGaugeVec,
    pub(crate) shadow_rows: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            inference: HistogramVec::new(
                HistogramOpts::new(
                    "lanes_scorer_inference_seconds",
                    "ONNX Runtime time per batch, by batch size (rows, rounded up to a power of two).",
                )
                .buckets(prometheus::exponential_buckets(0.000_01, 2.0, 18)?),
                &["batch_size"],
            )?,
            rows: IntCounter::new("lanes_scorer_rows_scored_total", "Rows scored.")?,
            batches: IntCounterVec::new(
                Opts::new("lanes_scorer_batches_total", "Batches read, by outcome (scored, dead_letter)."),
                &["outcome"],
            )?,
            shadow: IntGaugeVec::new(
                Opts::new("lanes_scorer_shadow_model_info", "The shadow model (1) by name and version."),
                &["name", "version"],
            )?,
            shadow_rows: IntCounterVec::new(
                Opts::new("lanes_scorer_shadow_rows_total", "Rows scored by the shadow model, by outcome (scored, failed, skipped: the shadow was busy)."),
                &["outcome"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new("lanes_scorer_dead_letters_total", "Batches dead-lettered, by error class."),
                &["class"],
            )?,
        };
        lanes_common::metrics::zeroed(&m.batches, &["scored", "dead_letter"]);
        lanes_common::metrics::zeroed(&m.shadow_rows, &["scored", "failed", "skipped"]);
        r.register(Box::new(m.inference.clone()))?;
        r.register(Box::new(m.rows.clone()))?;
        r.register(Box::new(m.batches.clone()))?;
        r.register(Box::new(m.shadow.clone()))?;
        r.register(Box::new(m.shadow_rows.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}
