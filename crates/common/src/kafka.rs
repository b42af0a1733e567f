//! Kafka clients as every Lanes service uses them: idempotent producers, consumers that
//! never commit on their own, a topic admin, and the offset bookkeeping that lets a
//! service commit an input only after everything it produced was acknowledged.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::FastMap;
use crate::config::KafkaConfig;
use crate::producer::{Delivery, Producer, Reports};

/// Why `name` is not a topic Kafka would accept: 1 to 249 characters of ASCII letters,
/// digits, `.`, `_` and `-`, not `.` or `..`. Checked before a name from a client becomes
/// a registry subject (`<topic>-value`, part of a URL path).
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!("{} characters (1 to 249 allowed)", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is reserved"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (ASCII letters, digits, '.', '_' and '-' only)"
        )),
        None => Ok(()),
    }
}

/// Properties shared by every client, then `kafka.properties` on top.
fn base_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", client_id);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Partitions of `topic` with their low and high watermarks.
pub fn watermarks(c: &impl Consumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let Some(t) = md.topics().first() else {
        anyhow::bail!("topic {topic}: no metadata");
    };
    if let Some(e) = t.error() {
        anyhow::bail!("topic {topic}: {:?}", RDKafkaErrorCode::from(e));
    }
    t.partitions()
        .iter()
        .map(|p| {
            let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            Ok((p.id(), lo, hi))
        })
        .collect()
}

/// Each partition of `topic` at its high watermark, as an assignment: where the records
/// written from now on begin.
pub fn end_offsets(c: &impl Consumer, topic: &str) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (partition, _, high) in watermarks(c, topic)? {
        tpl.add_partition_offset(topic, partition, Offset::Offset(high))?;
    }
    Ok(tpl)
}

/// Committed lag of `group` on `topic`: end offsets minus committed positions (a
/// partition with no commit counts from its start). Blocking.
pub fn group_lag(cfg: &KafkaConfig, group: &str, topic: &str) -> anyhow::Result<i64> {
    let mut c = base_config(cfg, "lanes-lag");
    c.set("group.id", group);
    let c: BaseConsumer = c.create()?;
    let marks = watermarks(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(marks
        .iter()
        .map(
            |(p, lo, hi)| match committed.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => hi - o,
                _ => hi - lo,
            },
        )
        .sum())
}

fn apply(c: &mut ClientConfig, props: &BTreeMap<String, String>) {
    for (k, v) in props {
        c.set(k, v);
    }
}

/// An idempotent producer (`acks=all`, no duplicates on internal retries) for a tool or
/// a job, which gives up on a delivery after librdkafka's `message.timeout.ms` and
/// reports it. Users may tune it through `kafka.producer_properties`, but not turn
/// idempotence off.
pub fn producer(cfg: &KafkaConfig, client_id: &str) -> KafkaResult<Producer> {
    Ok(Producer::new(
        producer_config(cfg, client_id, false).create_with_context(Reports)?,
    ))
}

/// [`producer`] for a service: it never gives up on a delivery unless the user sets a
/// timeout.
pub fn service_producer(cfg: &KafkaConfig, client_id: &str) -> KafkaResult<Producer> {
    Ok(Producer::new(
        producer_config(cfg, client_id, true).create_with_context(Reports)?,
    ))
}

/// The names of librdkafka's local delivery timeout.
const DELIVERY_TIMEOUT: [&str; 2] = ["message.timeout.ms", "delivery.timeout.ms"];

fn producer_config(cfg: &KafkaConfig, client_id: &str, never_give_up: bool) -> ClientConfig {
    let mut c = base_config(cfg, client_id);
    // A service commits its inputs only once their outputs are delivered, so a
    // delivery librdkafka gives up on (after 300 s by default) would stop it and replay
    // its inputs; never giving up (0) keeps retrying in order until the broker is
    // back, as Kafka advises for pipelines that must not lose records (KIP-91). A
    // timeout the user sets stands.
    let user_set =
        |k: &str| cfg.properties.contains_key(k) || cfg.producer_properties.contains_key(k);
    if never_give_up && !DELIVERY_TIMEOUT.iter().any(|k| user_set(k)) {
        c.set(DELIVERY_TIMEOUT[0], "0");
    }
    apply(&mut c, &cfg.producer_properties);
    c.set("enable.idempotence", "true").set("acks", "all");
    c
}

/// Hands `record` to the producer without waiting for its acknowledgement, waiting only
/// while librdkafka's queue is full. Await the returned delivery for the broker's answer.
pub async fn enqueue<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &Producer,
    record: FutureRecord<'_, K, P>,
) -> KafkaResult<Delivery> {
    producer.enqueue_one(record).await
}

/// An owned copy of a consumed record, with its headers when `headers`. Unlike
/// rdkafka's `detach`, a header name that is not UTF-8 comes with its invalid bytes
/// replaced: rdkafka panics reading such a name, and any producer can write one.
#[allow(unsafe_code)]
pub fn detach(
    m: &rdkafka::message::BorrowedMessage<'_>,
    headers: bool,
) -> rdkafka::message::OwnedMessage {
    use rdkafka::Message;
    // SAFETY: `m` is a live record delivered without error.
    unsafe { crate::queue::owned(m.ptr(), m.topic().to_string(), headers) }
}

/// The broker's answer to an enqueued record: its partition and offset.
pub async fn delivered(delivery: Delivery) -> KafkaResult<(i32, i64)> {
    delivery.await
}

/// Logs rebalances and failed commits; services that must act on a rebalance wrap or
/// replace it.
#[derive(Debug, Clone, Default)]
pub struct LoggingContext {
    pub service: String,
}

impl ClientContext for LoggingContext {}

impl ConsumerContext for LoggingContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => {
                tracing::warn!(service = %self.service, error = %e, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(service = %self.service, error = %e, offsets = %describe(offsets), "offset commit failed");
        }
    }
}

/// `topic[partition]@offset, ...` for logs.
pub fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}[{}]@{}", e.topic(), e.partition(), o),
            _ => format!("{}[{}]", e.topic(), e.partition()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A consumer in `group` that never commits or stores offsets by itself: services commit
/// through [`OffsetTracker`] after their output is acknowledged.
pub fn consumer<C: ConsumerContext + 'static>(
    cfg: &KafkaConfig,
    client_id: &str,
    group: &str,
    context: C,
) -> KafkaResult<StreamConsumer<C>> {
    consumer_config(cfg, client_id, group).create_with_context(context)
}

/// The configuration [`consumer`] uses, for callers that need another consumer type.
pub fn consumer_config(cfg: &KafkaConfig, client_id: &str, group: &str) -> ClientConfig {
    let mut c = base_config(cfg, client_id);
    c.set("group.id", group)
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    apply(&mut c, &cfg.consumer_properties);
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// [`consumer_config`] without librdkafka's statistics, for a consumer that feeds no
/// metrics (committed offsets, a benchmark's reader). With them on, a context that does
/// not take them has rdkafka log the whole report at INFO every interval.
pub fn quiet_consumer_config(cfg: &KafkaConfig, client_id: &str, group: &str) -> ClientConfig {
    let mut c = consumer_config(cfg, client_id, group);
    c.set("statistics.interval.ms", "0");
    c
}

/// Creates each missing topic with the configured partitions and replication factor.
/// Returns the topics it created; existing topics are left as they are.
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[&str]) -> KafkaResult<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = base_config(cfg, "lanes-admin").create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(topic) => {
                tracing::info!(%topic, partitions = cfg.partitions, "created topic");
                created.push(topic);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "could not create topic");
                });
            }
        }
    }
    Ok(created)
}

/// Where a commit may go for each partition, given the offsets read and those whose
/// output is acknowledged. Offsets of one partition are tracked in read order; the
/// committable position is the lowest offset still in flight (everything below it is
/// done), or one past the highest done when nothing is in flight.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// By topic, then partition: looked up by `&str` without allocating per message.
    topics: FastMap<String, FastMap<i32, PartitionOffsets>>,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    first_tracked: Option<i64>,
    /// Ascending: offsets are read in order, and acks come mostly in order too.
    in_flight: VecDeque<i64>,
    highest_done: Option<i64>,
    committed: Option<i64>,
}

impl PartitionOffsets {
    fn position(&self) -> Option<i64> {
        match self.in_flight.front() {
            // Everything tracked below `lowest` is done; if nothing was, there is no news.
            Some(&lowest) => self.first_tracked.filter(|&f| f < lowest).map(|_| lowest),
            None => self.highest_done.map(|d| d + 1),
        }
    }
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// An offset was read and its work started.
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) {
        let partitions = match self.topics.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.topics.entry(topic.to_string()).or_default(),
        };
        let p = partitions.entry(partition).or_default();
        p.first_tracked.get_or_insert(offset);
        match p.in_flight.back() {
            Some(&last) if last >= offset => {
                if let Err(i) = p.in_flight.binary_search(&offset) {
                    p.in_flight.insert(i, offset);
                }
            }
            _ => p.in_flight.push_back(offset),
        }
    }

    /// The work of an offset is acknowledged downstream (or dead-lettered).
    pub fn ack(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(p) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        else {
            return;
        };
        let found = if p.in_flight.front() == Some(&offset) {
            p.in_flight.pop_front().is_some()
        } else if let Ok(i) = p.in_flight.binary_search(&offset) {
            p.in_flight.remove(i).is_some()
        } else {
            false
        };
        if found {
            p.highest_done = Some(p.highest_done.map_or(offset, |d| d.max(offset)));
        }
    }

    /// Offsets still waiting for acknowledgement, across partitions.
    pub fn in_flight(&self) -> usize {
        self.topics
            .values()
            .flat_map(FastMap::values)
            .map(|p| p.in_flight.len())
            .sum()
    }

    /// Positions that advanced since the last [`OffsetTracker::committed`], as a list
    /// ready for `commit`; `None` when there is nothing new.
    pub fn committable(&self) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in &self.topics {
            for (partition, p) in partitions {
                if let Some(pos) = p.position()
                    && p.committed.is_none_or(|c| pos > c)
                {
                    tpl.add_partition_offset(topic, *partition, Offset::Offset(pos))
                        .expect("a fresh list accepts any offset");
                }
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }

    /// Records a successful commit of `tpl`.
    pub fn committed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let (Offset::Offset(o), Some(p)) = (
                e.offset(),
                self.topics
                    .get_mut(e.topic())
                    .and_then(|t| t.get_mut(&e.partition())),
            ) {
                p.committed = Some(p.committed.map_or(o, |c| c.max(o)));
            }
        }
    }

    /// Forgets a partition this consumer no longer owns.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.remove(&partition);
        }
    }
}

/// Commits what `tracker` allows, synchronously, and records it.
pub fn commit_acknowledged<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    tracker: &mut OffsetTracker,
) -> KafkaResult<()> {
    if let Some(tpl) = tracker.committable() {
        consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
        tracker.committed(&tpl);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked_as_kafka_checks_them() {
        for ok in ["lanes.responses.a", "A_b-9", ".x", &"t".repeat(249)] {
            assert_eq!(check_topic_name(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("", "0 characters"),
            (&*"t".repeat(250), "250 characters"),
            (".", "reserved"),
            ("..", "reserved"),
            ("lanes.responses.x/../y", "'/'"),
            ("lanes.responses.x?a=b", "'?'"),
            ("lanes.responses.x#", "'#'"),
            ("lanes.responses.x y", "' '"),
            ("lanes.responses.é", "'é'"),
        ] {
            let e = check_topic_name(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn producers_never_give_up_on_a_delivery_unless_told_to() {
        let mut cfg = crate::Settings::load_from(None, Default::default())
            .unwrap()
            .kafka;
        cfg.bootstrap_servers = "127.0.0.1:1".into();
        let timeout = |cfg: &KafkaConfig| {
            let c = producer_config(cfg, "t", true);
            DELIVERY_TIMEOUT.map(|k| c.get(k).map(str::to_string))
        };
        assert_eq!(timeout(&cfg), [Some("0".into()), None]);
        // A tool or a job gives up after librdkafka's default and says so.
        let tool = producer_config(&cfg, "t", false);
        assert_eq!(DELIVERY_TIMEOUT.map(|k| tool.get(k)), [None, None]);
        // librdkafka takes it beside linger and idempotence.
        cfg.producer_properties
            .insert("linger.ms".into(), "5".into());
        service_producer(&cfg, "t").expect("a producer that never times out a delivery");
        let mut own = cfg.clone();
        own.producer_properties
            .insert("delivery.timeout.ms".into(), "30000".into());
        assert_eq!(timeout(&own), [None, Some("30000".into())]);
        let mut shared = cfg.clone();
        shared
            .properties
            .insert("message.timeout.ms".into(), "60000".into());
        assert_eq!(timeout(&shared), [Some("60000".into()), None]);
    }

    fn positions(t: &OffsetTracker) -> Vec<(String, i32, i64)> {
        let mut v: Vec<_> = t
            .committable()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => (e.topic().to_string(), e.partition(), o),
                        other => panic!("unexpected {other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn nothing_to_commit_until_acked() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 10);
        t.track("a", 0, 11);
        assert!(t.committable().is_none());
        assert_eq!(t.in_flight(), 2);
    }

    #[test]
    fn commit_stops_at_the_lowest_unacked_offset() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.track("a", 0, o);
        }
        // Acked out of order: 10, 12, 13 done; 11 and 14 still in flight.
        t.ack("a", 0, 12);
        assert!(
            t.committable().is_none(),
            "10 is not done, nothing may be committed"
        );
        t.ack("a", 0, 10);
        t.ack("a", 0, 13);
        assert_eq!(positions(&t), vec![("a".into(), 0, 11)]);
        t.ack("a", 0, 11);
        assert_eq!(positions(&t), vec![("a".into(), 0, 14)]);
        t.ack("a", 0, 14);
        assert_eq!(positions(&t), vec![("a".into(), 0, 15)]);
    }

    #[test]
    fn partitions_are_independent_and_commits_are_not_repeated() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 5);
        t.track("a", 1, 7);
        t.track("b", 0, 1);
        t.ack("a", 0, 5);
        t.ack("b", 0, 1);
        assert_eq!(positions(&t), vec![("a".into(), 0, 6), ("b".into(), 0, 2)]);
        let tpl = t.committable().unwrap();
        t.committed(&tpl);
        assert!(
            t.committable().is_none(),
            "an unchanged position is not committed again"
        );
        t.ack("a", 1, 7);
        assert_eq!(positions(&t), vec![("a".into(), 1, 8)]);
    }

    #[test]
    fn acking_an_untracked_offset_changes_nothing() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 3);
        t.ack("a", 0, 99);
        t.ack("z", 4, 1);
        assert!(t.committable().is_none());
        t.forget("a", 0);
        assert_eq!(t.in_flight(), 0);
    }

    mod properties {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::super::*;

        fn position(t: &OffsetTracker, partition: i32) -> Option<i64> {
            t.committable().and_then(|tpl| {
                tpl.find_partition("t", partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
            })
        }

        proptest! {
            /// Under any interleaving of reads, acks in any order and commits, no commit
            /// passes the lowest offset not yet acknowledged, none goes backwards, and
            /// once everything is acknowledged each partition commits one past its last.
            #[test]
            fn never_commits_past_the_lowest_unacknowledged(
                reads in prop::collection::vec((0i32..3, 1i64..4), 1..120),
                steps in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>(), any::<bool>()), 0..300),
            ) {
                // Offsets rise per partition with gaps (control records, compaction).
                let mut next: BTreeMap<i32, i64> = BTreeMap::new();
                let reads: Vec<(i32, i64)> = reads
                    .into_iter()
                    .map(|(p, gap)| {
                        let o = next.entry(p).or_insert(100);
                        *o += gap;
                        (p, *o)
                    })
                    .collect();
                let mut t = OffsetTracker::new();
                let mut read = 0;
                let mut open: Vec<(i32, i64)> = Vec::new();
                let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
                let check = |t: &OffsetTracker, open: &[(i32, i64)], committed: &BTreeMap<i32, i64>| {
                    for p in 0..3 {
                        if let Some(pos) = position(t, p) {
                            if let Some(low) = open.iter().filter(|(q, _)| *q == p).map(|(_, o)| *o).min() {
                                prop_assert!(pos <= low, "partition {} commits {} past unacked {}", p, pos, low);
                            }
                            if let Some(c) = committed.get(&p) {
                                prop_assert!(pos > *c, "partition {} offers {} after committing {}", p, pos, c);
                            }
                        }
                    }
                    Ok(())
                };
                for (read_next, pick, commit) in steps {
                    if (read_next || open.is_empty()) && read < reads.len() {
                        let (p, o) = reads[read];
                        read += 1;
                        t.track("t", p, o);
                        open.push((p, o));
                    } else if !open.is_empty() {
                        let (p, o) = open.swap_remove(pick.index(open.len()));
                        t.ack("t", p, o);
                    }
                    check(&t, &open, &committed)?;
                    if commit && let Some(tpl) = t.committable() {
                        for e in tpl.elements() {
                            if let Offset::Offset(o) = e.offset() {
                                committed.insert(e.partition(), o);
                            }
                        }
                        t.committed(&tpl);
                    }
                }
                for &(p, o) in &reads[read..] {
                    t.track("t", p, o);
                    open.push((p, o));
                }
                while let Some((p, o)) = open.pop() {
                    t.ack("t", p, o);
                    check(&t, &open, &committed)?;
                }
                prop_assert_eq!(t.in_flight(), 0);
                for (p, last) in &next {
                    let pos = position(&t, *p).or(committed.get(p).copied());
                    prop_assert_eq!(pos, Some(last + 1));
                }
            }
        }
    }
}
