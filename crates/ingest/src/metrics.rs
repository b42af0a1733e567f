//! The ingest metrics, named `lanes_ingest_<what>_<unit>`, registered once per
//! process registry.

use prometheus::{IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) events: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> anyhow::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "lanes_ingest_events_total",
                "Events read, by wire format (json, avro) and outcome (valid, dead_letter).",
            ),
            &["format", "outcome"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "lanes_ingest_dead_letters_total",
                "Events dead-lettered, by error class.",
            ),
            &["class"],
        )?;
        lanes_common::metrics::zeroed_product(
            &events,
            &[&["json", "avro"], &["valid", "dead_letter"]],
        );
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        Ok(Self {
            events,
            dead_letters,
        })
    }
}
