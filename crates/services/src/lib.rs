//! The one list of Lanes services. `lanes up`, the benchmarks, the operator CLI's
//! status and lag views and the test harness all take their services, admin ports,
//! consumer groups and input topics from here, and start them the one way
//! ([`lanes_common::service::host`]); each binary's `main` is the same host for one.

use lanes_common::service::ServiceDef;

/// The streaming lane, upstream first.
pub fn streaming() -> Vec<ServiceDef> {
    vec![
        lanes_ingest::def(),
        lanes_micro_batcher::def(),
        lanes_scorer::def(),
        lanes_cache_writer::def(),
    ]
}

/// Every service `lanes up` runs: the streaming lane and the fallback-responder.
pub fn all() -> Vec<ServiceDef> {
    let mut all = streaming();
    all.push(lanes_fallback_responder::def());
    all
}
