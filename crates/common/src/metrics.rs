//! Small helpers for the services' Prometheus metrics.

use prometheus::IntCounterVec;

/// Creates each labelled series at zero, so it is exported (and alerts and dashboards see
/// it) before the first event of its kind.
pub fn zeroed(counter: &IntCounterVec, values: &[&str]) {
    for v in values {
        counter.with_label_values(&[v]);
    }
}
