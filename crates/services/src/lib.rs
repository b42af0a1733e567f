//! The one list of Lanes services. `lanes up`, the benchmarks, the operator CLI's
//! status and lag views and the test harness all take their services, admin ports,
//! consumer groups and input topics from here, and start them the one way
//! ([`lanes_common::service::host`]); each binary's `main` is the same host for one.

use lanes_common::Settings;
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

/// Gives a deployment its own topics, cache prefix and consumer groups
/// (`<id>-<service>`), so it can share a broker and a Redis with others.
pub fn namespace(settings: &mut Settings, id: &str) {
    settings.namespace(id);
    for def in all() {
        *(def.group)(settings) = format!("{id}-{}", def.name);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn a_namespace_renames_every_services_group_and_input() {
        let mut s = Settings::load_from(None, HashMap::new()).unwrap();
        namespace(&mut s, "t1");
        let mut groups = HashSet::new();
        for def in all() {
            for (group, topic) in (def.inputs)(&s) {
                assert!(group.starts_with("t1-"), "{}: {group}", def.name);
                assert!(topic.starts_with("t1."), "{}: {topic}", def.name);
                groups.insert(group);
            }
        }
        assert_eq!(groups.len(), 7, "every input has its own group: {groups:?}");
    }

    #[test]
    fn ingest_reads_the_avro_topic_only_while_its_loop_is_on() {
        let mut s = Settings::load_from(None, HashMap::new()).unwrap();
        let topics = |s: &Settings| -> Vec<String> {
            (lanes_ingest::def().inputs)(s)
                .into_iter()
                .map(|(_, t)| t)
                .collect()
        };
        assert_eq!(topics(&s), ["lanes.events.raw", "lanes.events.avro"]);
        s.ingest.avro = false;
        assert_eq!(topics(&s), ["lanes.events.raw"]);
    }
}
