//! Small helpers for the services' Prometheus metrics.

use prometheus::IntCounterVec;

/// Creates each labelled series at zero, so it is exported (and alerts and dashboards see
/// it) before the first event of its kind.
pub fn zeroed(counter: &IntCounterVec, values: &[&str]) {
    zeroed_product(counter, &[values]);
}

/// [`zeroed`] for a counter with several labels: every combination of `values`, one
/// slice per label in the counter's label order.
pub fn zeroed_product(counter: &IntCounterVec, values: &[&[&str]]) {
    let mut combos: Vec<Vec<&str>> = vec![vec![]];
    for label in values {
        combos = combos
            .iter()
            .flat_map(|c| label.iter().map(move |v| [c.as_slice(), &[*v]].concat()))
            .collect();
    }
    for c in combos {
        counter.with_label_values(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    #[test]
    fn zeroed_product_exports_every_combination_at_zero() {
        let c = IntCounterVec::new(Opts::new("c", "c"), &["format", "outcome"]).unwrap();
        zeroed_product(&c, &[&["json", "avro"], &["valid", "dead_letter", "late"]]);
        let mut seen: Vec<String> = prometheus::core::Collector::collect(&c)[0]
            .get_metric()
            .iter()
            .map(|m| {
                assert_eq!(m.get_counter().get_value(), 0.0);
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "avro/dead_letter",
                "avro/late",
                "avro/valid",
                "json/dead_letter",
                "json/late",
                "json/valid"
            ]
        );
    }
}
