//! A Kafka input for a service: a thread polls the consumer and hands messages and
//! rebalances to the service's async loop in order, a turn's records in one send, and
//! [`Acks`] commits an input offset only after the output it caused is acknowledged.
//!
//! Backpressure, not eviction: each assigned partition gets its own librdkafka queue,
//! which the thread drains only while the service has room. When the service falls
//! behind (a dependency is down, its in-flight limit is reached) those queues are left
//! alone: librdkafka stops fetching once a partition holds `queued.max.messages.kbytes`,
//! the channel to the service holds at most 4,096 records and about 8 MiB of them,
//! while the thread keeps polling the consumer's own queue, so the member stays in its
//! group and rebalances are still served. Nothing is paused and nothing refetched: on
//! the embedded broker a fetch that starts inside a record batch skips the rest of that
//! batch, which a `pause()`/`resume()` would do every time.
//!
//! Assignment rewinds: each newly assigned partition starts `rewind_records` before its
//! committed offset and the thread drops what lies below it, because that broker also
//! answers a fetch starting mid-batch (a commit is usually mid-batch) from the next one.
//! A partition assigned while the group's committed offset cannot be read (a coordinator
//! away or loading) is held at its first record until the offset is known, asked
//! between polling turns so the member keeps serving its group; past the drain timeout
//! it is read again from `rewind_records` before that record: a replay, never a gap.
//!
//! Offsets follow each other: a record past the next expected offset seeks its
//! partition back, for up to `gap_wait_ms`. tansu 0.6 advances a partition's high
//! watermark before it writes the record batch, so with two producers on one partition
//! a fetch can list a later batch before an earlier one exists, and step over it.
//!
//! An idle source sleeps: the consumer's queue (rebalances, commit results, errors) and
//! each partition's queue ring the polling thread when something arrives in them, the
//! service rings it when it has taken half the channel after it filled, and `close`
//! rings it too. It waits on a timer only while a held partition's committed offset is
//! asked for or the consumer's queue is busy; a 1 s timeout bounds a missed ring.
//!
//! Revocation is synchronous: librdkafka calls the rebalance callback on the polling
//! thread, which sends [`SourceEvent::Revoked`] after every message already fetched from
//! those partitions, and waits until the service has flushed, drained and committed them
//! (or the drain deadline passes). Only then does the partition move to another member.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use crate::service::ConsumerMetrics;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{KafkaConfig, RunnerConfig};
use crate::dlq::{DeadLetter, DlqWriter, ErrorClass};
use crate::error::Failure;
use crate::kafka::{OffsetTracker, describe};
use crate::producer::Reported;
use crate::queue::{EventQueue, RecordQueue};

/// What the polling thread tells the service, in order.
#[derive(Debug)]
pub enum SourceEvent {
    Message(OwnedMessage),
    Assigned(Vec<(String, i32)>),
    /// Flush, drain and commit these partitions, then answer on `done`.
    Revoked {
        partitions: Vec<(String, i32)>,
        done: std_mpsc::SyncSender<()>,
    },
}

/// What crosses the channel: a polling turn's records go together, one send and one
/// wake-up for up to [`TURN`] of them rather than one per record.
#[derive(Debug)]
enum Handoff {
    /// Records and the bytes they hold (see [`size`]).
    Messages(Vec<OwnedMessage>, usize),
    Event(SourceEvent),
}

/// Whether the service took what was handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Yes,
    /// No room: the records wait in `pending`.
    Full,
    /// The service has gone away.
    Gone,
}

/// How a newly assigned partition's first records are checked.
#[derive(Debug)]
enum Start {
    /// Read from `rewind_records` before the committed offset: records below it were
    /// done already and are dropped.
    Floor(i64),
    /// Assigned while the group's committed offset could not be read, or before the
    /// group ever committed: checked at the first record.
    Unverified,
    /// The first records of an unverified partition, held (its queue left alone) until
    /// the group reports its committed offset. The polling thread asks between turns,
    /// never blocking them: the member must keep serving its group meanwhile.
    Holding {
        held: VecDeque<OwnedMessage>,
        since: std::time::Instant,
        asked: Option<std::time::Instant>,
    },
}

/// Where a partition's next record must be. Offsets of a topic without transactions or
/// compaction follow each other; tansu 0.6 breaks that when two producers write one
/// partition at once (it can list a record batch before an earlier one is written,
/// and a fetch then passes the earlier one by), so a gap is fetched again.
#[derive(Debug, Default)]
struct Continuity {
    next: Option<i64>,
    /// Since when the gap at `next` has been fetched again, and when last.
    gap: Option<(std::time::Instant, std::time::Instant)>,
}

/// What to do with a record, given its partition's [`Continuity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Take,
    /// Read already: a batch fetched twice, or what a seek back delivers again.
    Drop,
    /// Past a gap: fetch again from this offset (the record is read again then).
    Refetch(i64),
    /// Past a gap that stayed for the whole wait: take it, `from..to` were never read.
    Skip {
        from: i64,
        to: i64,
    },
}

/// How often a partition with a gap is fetched again.
const REFETCH_EVERY: Duration = Duration::from_millis(20);

impl Step {
    /// Whether the record is handed on.
    fn takes(self) -> bool {
        matches!(self, Step::Take | Step::Skip { .. })
    }
}

impl Continuity {
    /// `now` is read only at a gap: most records follow their predecessor.
    fn step(&mut self, offset: i64, wait: Duration, now: impl Fn() -> std::time::Instant) -> Step {
        let next = match self.next {
            Some(next) if !wait.is_zero() => next,
            _ => {
                self.next = Some(offset + 1);
                return Step::Take;
            }
        };
        if offset < next {
            return Step::Drop;
        }
        if offset == next {
            self.next = Some(offset + 1);
            self.gap = None;
            return Step::Take;
        }
        let now = now();
        match self.gap {
            Some((since, _)) if now.duration_since(since) >= wait => {
                self.next = Some(offset + 1);
                self.gap = None;
                Step::Skip {
                    from: next,
                    to: offset,
                }
            }
            Some((_, last)) if now.duration_since(last) < REFETCH_EVERY => Step::Drop,
            Some((since, _)) => {
                self.gap = Some((since, now));
                Step::Refetch(next)
            }
            None => {
                self.gap = Some((now, now));
                Step::Refetch(next)
            }
        }
    }
}

/// What to do with a held partition, given what the group and the log report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing was skipped: hand on the held records from `floor` (the committed offset).
    Release { floor: i64 },
    /// The broker resumed past the committed offset `floor`: read again from `start`.
    Rewind { start: i64, floor: i64 },
    /// Still unknown: ask again later.
    Wait,
    /// Unknown for too long: read again from `start`, replaying rather than risking a gap.
    Replay { start: i64 },
}

/// Decides for a held partition whose first record read is `first`. `committed` is the
/// group's committed offset if the broker reported one, `low` the log's first offset,
/// `expired` whether the partition has been held as long as it may be.
fn verdict(
    first: i64,
    committed: Option<i64>,
    low: Option<i64>,
    rewind: i64,
    expired: bool,
) -> Verdict {
    match committed {
        Some(c) if first > c => Verdict::Rewind {
            start: (c - rewind).max(0),
            floor: c,
        },
        Some(c) => Verdict::Release { floor: c },
        // Nothing before the log's start could have been skipped.
        None if low.is_some_and(|low| first <= low) => Verdict::Release { floor: first },
        None if expired => Verdict::Replay {
            start: (first - rewind).max(0),
        },
        None => Verdict::Wait,
    }
}

pub struct SourceContext {
    service: String,
    metrics: Option<ConsumerMetrics>,
    events: Mutex<Option<mpsc::Sender<Handoff>>>,
    /// Fetched messages the service has no room for yet, oldest first.
    pending: Mutex<VecDeque<OwnedMessage>>,
    /// Partitions assigned or revoked since the thread last looked: their queues are to
    /// be split off or dropped.
    assigned: Mutex<Vec<(String, i32)>>,
    revoked: Mutex<Vec<(String, i32)>>,
    /// What this member holds now: lag is reported for these only.
    owned: Mutex<HashSet<(String, i32)>>,
    revoke_timeout: Duration,
    /// See [`crate::config::RunnerConfig::rewind_records`].
    rewind: i64,
    /// See [`crate::config::RunnerConfig::gap_wait_ms`].
    gap_wait: Duration,
    /// A client of the same group that never joins it, to read committed offsets from
    /// inside a rebalance callback (the member's own request waits for the rebalance).
    offsets: Option<BaseConsumer>,
    /// Newly assigned partitions whose first records are still to be checked.
    floors: Mutex<HashMap<(String, i32), Start>>,
    /// Whether `floors` has entries, so most messages skip its lock.
    rewinding: AtomicBool,
    headers: RecordHeaders,
}

/// Whether a source's records keep their Kafka headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordHeaders {
    Keep,
    /// Records come without headers. librdkafka parses a record's headers when asked for
    /// them, even none (an allocation and a free per record), so a stage that reads no
    /// header saves that.
    Skip,
}

impl SourceContext {
    /// An owned copy of `m`, with its headers only where they are kept.
    fn detach(&self, m: &BorrowedMessage<'_>) -> OwnedMessage {
        crate::kafka::detach(m, self.headers == RecordHeaders::Keep)
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// How often a held partition asks the group for its committed offset.
const ASK_EVERY: Duration = Duration::from_millis(100);

impl SourceContext {
    /// Sets the owned-partition gauge of every topic among `changed`.
    fn publish_owned(&self, owned: &HashSet<(String, i32)>, changed: &[(String, i32)]) {
        let Some(m) = &self.metrics else { return };
        let topics: HashSet<&str> = changed.iter().map(|(t, _)| t.as_str()).collect();
        for topic in topics {
            let n = owned.iter().filter(|(t, _)| t == topic).count();
            m.assigned
                .with_label_values(&[&self.service, topic])
                .set(n as i64);
            // At zero from the start, so an alert's increase() sees the first gap.
            for outcome in ["refetched", "skipped"] {
                m.gaps.with_label_values(&[&self.service, topic, outcome]);
            }
        }
    }

    /// Starts each partition of `tpl` with a committed offset `rewind` records earlier,
    /// and remembers that offset as the partition's floor.
    fn rewind(&self, tpl: &mut TopicPartitionList) {
        let Some(offsets) = self.offsets.as_ref().filter(|_| tpl.count() > 0) else {
            return;
        };
        let committed = match offsets
            .committed_offsets(tpl.clone(), Duration::from_secs(5))
            .map(crate::failpoint::committed_read)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "committed offsets unknown; each partition is checked at its first record");
                // As if the group had answered "none" for each: unverified below.
                let mut unknown = tpl.clone();
                let _ = unknown.set_all_offsets(Offset::Invalid);
                unknown
            }
        };
        let mut floors = self.floors.lock().expect("source lock");
        for e in committed.elements() {
            let key = (e.topic().to_string(), e.partition());
            match e.offset() {
                Offset::Offset(c) if c > 0 => {
                    let start = (c - self.rewind).max(0);
                    if tpl
                        .set_partition_offset(e.topic(), e.partition(), Offset::Offset(start))
                        .is_ok()
                    {
                        tracing::debug!(service = %self.service, topic = e.topic(), partition = e.partition(), committed = c, start, "rewinding");
                        floors.insert(key, Start::Floor(c));
                    }
                }
                other => {
                    tracing::debug!(service = %self.service, topic = e.topic(), partition = e.partition(), committed = ?other, "committed offset not known yet");
                    floors.insert(key, Start::Unverified);
                }
            }
        }
        self.rewinding.store(!floors.is_empty(), Ordering::Relaxed);
    }

    /// `m` if it is to be handed on: a record below its partition's floor (read again
    /// by the rewind) is dropped, and the first record at or past the floor lifts it.
    /// The first record of a partition assigned without a known committed offset is
    /// held, with any that follow, until [`SourceContext::verify_held`] knows whether
    /// the broker skipped the rest of a record batch.
    fn admit(&self, m: OwnedMessage) -> Option<OwnedMessage> {
        if !self.rewinding.load(Ordering::Relaxed) {
            return Some(m);
        }
        let mut floors = self.floors.lock().expect("source lock");
        let key = (m.topic().to_string(), m.partition());
        match floors.get_mut(&key) {
            None => return Some(m),
            Some(Start::Floor(floor)) if m.offset() < *floor => return None,
            Some(Start::Floor(_)) => {}
            // A first record at offset 0 cannot have skipped anything.
            Some(Start::Unverified) if m.offset() <= 0 => {}
            Some(start @ Start::Unverified) => {
                *start = Start::Holding {
                    held: VecDeque::from([m]),
                    since: std::time::Instant::now(),
                    asked: None,
                };
                return None;
            }
            Some(Start::Holding { held, .. }) => {
                held.push_back(m);
                return None;
            }
        }
        floors.remove(&key);
        self.rewinding.store(!floors.is_empty(), Ordering::Relaxed);
        Some(m)
    }

    /// Whether `key`'s records are held: its queue is left alone meanwhile.
    fn holding(&self, key: &(String, i32)) -> bool {
        self.rewinding.load(Ordering::Relaxed)
            && matches!(
                self.floors.lock().expect("source lock").get(key),
                Some(Start::Holding { .. })
            )
    }

    /// Whether any partition's records are held.
    fn holds_any(&self) -> bool {
        self.rewinding.load(Ordering::Relaxed)
            && (self.floors.lock().expect("source lock").values())
                .any(|s| matches!(s, Start::Holding { .. }))
    }

    /// Asks the group, at most every [`ASK_EVERY`], for the committed offset of each held
    /// partition, and releases, rewinds or replays it (see [`verdict`]). Released
    /// records go to `pending`, ahead of anything the partition's queue holds.
    fn verify_held(&self, consumer: &SourceConsumer) {
        if !self.rewinding.load(Ordering::Relaxed) {
            return;
        }
        let Some(offsets) = self.offsets.as_ref() else {
            return;
        };
        let now = std::time::Instant::now();
        let mut due = TopicPartitionList::new();
        for ((topic, partition), start) in self.floors.lock().expect("source lock").iter_mut() {
            if let Start::Holding { asked, .. } = start
                && asked.is_none_or(|at| now.duration_since(at) >= ASK_EVERY)
            {
                *asked = Some(now);
                due.add_partition(topic, *partition);
            }
        }
        if due.count() == 0 {
            return;
        }
        // Short waits: the thread must get back to serving the group.
        let committed = offsets
            .committed_offsets(due.clone(), Duration::from_millis(500))
            .map(crate::failpoint::committed_read)
            .map_err(|e| tracing::debug!(service = %self.service, error = %e, "committed offsets not read; asking again"))
            .ok();
        for e in due.elements() {
            let key = (e.topic().to_string(), e.partition());
            let c = committed
                .as_ref()
                .and_then(|c| c.find_partition(e.topic(), e.partition()))
                .and_then(|e| match e.offset() {
                    Offset::Offset(c) => Some(c),
                    _ => None,
                });
            let (first, expired) = match self.floors.lock().expect("source lock").get(&key) {
                Some(Start::Holding { held, since, .. }) => (
                    held.front().map_or(0, |m| m.offset()),
                    now.duration_since(*since) >= self.revoke_timeout,
                ),
                // Revoked meanwhile.
                _ => continue,
            };
            let low = if c.is_none() {
                offsets
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500))
                    .ok()
                    .map(|(low, _)| low)
            } else {
                None
            };
            let v = verdict(first, c, low, self.rewind, expired);
            self.settle(consumer, &key, first, v);
        }
        let floors = self.floors.lock().expect("source lock");
        self.rewinding.store(!floors.is_empty(), Ordering::Relaxed);
    }

    /// Carries out `v` for the held partition `key`, whose first held record is `first`.
    fn settle(&self, consumer: &SourceConsumer, key: &(String, i32), first: i64, v: Verdict) {
        let (topic, partition) = (key.0.as_str(), key.1);
        let (start, floor) = match v {
            Verdict::Wait => return,
            Verdict::Release { floor } => {
                tracing::debug!(service = %self.service, topic, partition, floor, first, "held records verified");
                let mut floors = self.floors.lock().expect("source lock");
                let Some(Start::Holding { held, .. }) =
                    floors.insert(key.clone(), Start::Floor(floor))
                else {
                    return;
                };
                drop(floors);
                let admitted: Vec<OwnedMessage> =
                    held.into_iter().filter_map(|m| self.admit(m)).collect();
                self.pending.lock().expect("source lock").extend(admitted);
                return;
            }
            Verdict::Rewind { start, floor } => {
                tracing::warn!(service = %self.service, topic, partition, committed = floor, first, start, "the broker resumed past the committed offset; reading again from before it");
                (start, Some(floor))
            }
            Verdict::Replay { start } => {
                tracing::warn!(service = %self.service, topic, partition, first, start, waited = ?self.revoke_timeout, "the group's committed offset stayed unknown; reading again from before the first record rather than risk a gap");
                (start, None)
            }
        };
        match consumer.seek(
            topic,
            partition,
            Offset::Offset(start),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                let mut floors = self.floors.lock().expect("source lock");
                match floor {
                    Some(floor) => floors.insert(key.clone(), Start::Floor(floor)),
                    None => floors.remove(key),
                };
            }
            // Still held: the next turn asks and seeks again.
            Err(e) => {
                tracing::warn!(service = %self.service, topic, partition, start, error = %e, "seek back failed; still holding the partition")
            }
        }
    }

    /// Commits each rewound partition's floor again. librdkafka learns a committed
    /// offset only by fetching it, which an explicit start skips; without it the
    /// partition has no lag figures until this member commits something new.
    fn confirm_floors(&self, consumer: &SourceConsumer, assigned: &[(String, i32)]) {
        let mut tpl = TopicPartitionList::new();
        {
            let floors = self.floors.lock().expect("source lock");
            for key in assigned {
                if let Some(Start::Floor(c)) = floors.get(key) {
                    let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(*c));
                }
            }
        }
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::warn!(service = %self.service, error = %e, "rewound offsets not confirmed");
        }
    }

    /// The step `m` takes after what was handed on from its partition (see
    /// [`Continuity`]); a gap seeks the partition back to it, at most for `gap_wait`.
    fn follows(&self, consumer: &SourceConsumer, c: &mut Continuity, m: &OwnedMessage) -> Step {
        let step = c.step(m.offset(), self.gap_wait, std::time::Instant::now);
        match step {
            Step::Take | Step::Drop => {}
            Step::Refetch(from) => {
                if c.gap.is_some_and(|(since, last)| since == last) {
                    tracing::debug!(service = %self.service, topic = m.topic(), partition = m.partition(), from, to = m.offset(), "gap in the partition's offsets; fetching it again");
                    self.count_gap(m.topic(), "refetched");
                }
                if let Err(e) = consumer.seek(
                    m.topic(),
                    m.partition(),
                    Offset::Offset(from),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(service = %self.service, topic = m.topic(), partition = m.partition(), from, error = %e, "seek back to a gap failed; trying again");
                }
            }
            Step::Skip { from, to } => {
                tracing::error!(service = %self.service, topic = m.topic(), partition = m.partition(), from, to, waited = ?self.gap_wait, "offsets missing from the partition; stepping over them");
                self.count_gap(m.topic(), "skipped");
            }
        }
        step
    }

    fn count_gap(&self, topic: &str, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.gaps
                .with_label_values(&[&self.service, topic, outcome])
                .inc();
        }
    }

    /// Sends `event`, waiting at most `timeout` for room; false if the service is gone
    /// or did not make room in time.
    fn send_within(&self, event: SourceEvent, timeout: Duration) -> bool {
        let Some(tx) = self.events.lock().expect("source lock").clone() else {
            return false;
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut event = Handoff::Event(event);
        loop {
            match tx.try_send(event) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(e)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    event = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Hands waiting messages on, a turn's worth (or [`TURN_BYTES`]) at a time, while
    /// the channel has room. Returns false once the service has gone away.
    fn forward(&self, tx: &mpsc::Sender<Handoff>, room: &RoomBell) -> bool {
        if tx.is_closed() {
            return false;
        }
        let mut pending = self.pending.lock().expect("source lock");
        // Only while there is room: a turn copied out and refused is copied back.
        while !pending.is_empty() && tx.capacity() > 0 && !room.over() {
            let (mut n, mut bytes) = (0, 0);
            for m in pending.iter().take(TURN) {
                if bytes >= TURN_BYTES {
                    break;
                }
                n += 1;
                bytes += size(m);
            }
            let chunk: Vec<OwnedMessage> = pending.drain(..n).collect();
            // Counted before the send: the service may take it before a count after.
            room.handed(bytes);
            match tx.try_send(Handoff::Messages(chunk, bytes)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Handoff::Messages(chunk, _))) => {
                    room.taken(bytes);
                    for m in chunk.into_iter().rev() {
                        pending.push_front(m);
                    }
                    break;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Hands `chunk` (of `bytes`) on; with no room, by count or by bytes, it waits in
    /// `pending`, which must be empty (it follows anything waiting there).
    fn hand_on(
        &self,
        tx: &mpsc::Sender<Handoff>,
        room: &RoomBell,
        chunk: Vec<OwnedMessage>,
        bytes: usize,
    ) -> Taken {
        if room.over() {
            self.pending.lock().expect("source lock").extend(chunk);
            return Taken::Full;
        }
        room.handed(bytes);
        match tx.try_send(Handoff::Messages(chunk, bytes)) {
            Ok(()) => Taken::Yes,
            Err(mpsc::error::TrySendError::Full(Handoff::Messages(chunk, _))) => {
                room.taken(bytes);
                self.pending.lock().expect("source lock").extend(chunk);
                Taken::Full
            }
            Err(_) => Taken::Gone,
        }
    }
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics carry each assigned partition's lag.
    fn stats(&self, statistics: Statistics) {
        let Some(lag) = self.metrics.as_ref().map(|m| &m.lag) else {
            return;
        };
        let owned = self.owned.lock().expect("source lock");
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal partition; a negative lag is unknown; a
                // partition another member took keeps its last figures in the statistics.
                if *partition >= 0
                    && p.consumer_lag >= 0
                    && owned.contains(&(topic.clone(), *partition))
                {
                    lag.with_label_values(&[&self.service, topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    /// rdkafka's own rebalance, with the rewind applied to an assignment first.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.rewind(tpl);
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(KafkaError::Rebalance(RDKafkaErrorCode::from(other))),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match (assign, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(service = %self.service, error = %e, "rebalance not applied");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions revoked, draining");
            let revoked = partitions(tpl);
            {
                let mut owned = self.owned.lock().expect("source lock");
                for key in &revoked {
                    owned.remove(key);
                }
                self.publish_owned(&owned, &revoked);
            }
            {
                let mut floors = self.floors.lock().expect("source lock");
                for key in &revoked {
                    floors.remove(key);
                }
                self.rewinding.store(!floors.is_empty(), Ordering::Relaxed);
            }
            self.revoked
                .lock()
                .expect("source lock")
                .extend(revoked.iter().cloned());
            // Messages not yet handed on were never tracked: the next owner reads them.
            self.pending.lock().expect("source lock").retain(|m| {
                !revoked
                    .iter()
                    .any(|(t, p)| m.topic() == t && m.partition() == *p)
            });
            if let Some(m) = &self.metrics {
                m.rebalances
                    .with_label_values(&[&self.service, "revoked"])
                    .inc();
                let lag = &m.lag;
                for (topic, partition) in &revoked {
                    let _ =
                        lag.remove_label_values(&[&self.service, topic, &partition.to_string()]);
                }
            }
            let (done, wait) = std_mpsc::sync_channel(1);
            let sent = self.send_within(
                SourceEvent::Revoked {
                    partitions: revoked,
                    done,
                },
                self.revoke_timeout,
            );
            if !sent || wait.recv_timeout(self.revoke_timeout).is_err() {
                // While closing, the service committed before leaving: nothing to drain.
                if self.events.lock().expect("source lock").is_some() {
                    tracing::warn!(service = %self.service, "revoked partitions not drained in time; their records will be replayed");
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions assigned");
                if let Some(m) = &self.metrics {
                    m.rebalances
                        .with_label_values(&[&self.service, "assigned"])
                        .inc();
                }
                let assigned = partitions(tpl);
                let mut owned = self.owned.lock().expect("source lock");
                owned.extend(assigned.iter().cloned());
                self.publish_owned(&owned, &assigned);
                drop(owned);
                self.assigned
                    .lock()
                    .expect("source lock")
                    .extend(partitions(tpl));
                self.send_within(SourceEvent::Assigned(partitions(tpl)), self.revoke_timeout);
            }
            Rebalance::Revoke(_) => {}
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

pub type SourceConsumer = BaseConsumer<SourceContext>;

/// A subscribed consumer polled on its own thread.
pub struct Source {
    /// Taken by `close` (or `drop`), which hands it to a thread of its own: librdkafka's
    /// close serves rebalances and waits on the group coordinator without a limit, and
    /// must never hold a runtime worker or the runtime's shutdown.
    consumer: Option<Arc<SourceConsumer>>,
    events: mpsc::Receiver<Handoff>,
    /// The rest of the last turn's records, handed out one by one.
    received: std::vec::IntoIter<OwnedMessage>,
    stop: Arc<AtomicBool>,
    /// Wakes the polling thread (see [`Wake`]).
    ring: std_mpsc::SyncSender<()>,
    /// Rung when the service made room the polling thread waits for.
    room: Arc<RoomBell>,
    thread: Option<std::thread::JoinHandle<()>>,
    close_timeout: Duration,
}

impl Source {
    /// Subscribes `group` to `topics`. `revoke_timeout` bounds how long a rebalance waits
    /// for the service to drain (and a partition is held for its committed offset);
    /// `runner` gives the rewind and the gap wait.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &KafkaConfig,
        service: &str,
        group: &str,
        topics: &[&str],
        revoke_timeout: Duration,
        runner: &RunnerConfig,
        headers: RecordHeaders,
        metrics: Option<ConsumerMetrics>,
    ) -> KafkaResult<Self> {
        let rewind_records = runner.rewind_records;
        let (tx, rx) = mpsc::channel(PREFETCH / TURN);
        let context = SourceContext {
            service: service.to_string(),
            events: Mutex::new(Some(tx.clone())),
            pending: Mutex::new(VecDeque::new()),
            assigned: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
            owned: Mutex::new(HashSet::new()),
            revoke_timeout,
            rewind: rewind_records,
            gap_wait: Duration::from_millis(runner.gap_wait_ms),
            offsets: if rewind_records > 0 {
                Some(
                    crate::kafka::quiet_consumer_config(cfg, &format!("{service}-offsets"), group)
                        .create()?,
                )
            } else {
                None
            },
            floors: Mutex::new(HashMap::new()),
            rewinding: AtomicBool::new(false),
            headers,
            metrics,
        };
        let consumer: SourceConsumer =
            crate::kafka::consumer_config(cfg, service, group).create_with_context(context)?;
        consumer.subscribe(topics)?;
        let (ring, wake) = std_mpsc::sync_channel::<()>(1);
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let room = Arc::new(RoomBell::new(ring.clone()));
        let thread = {
            let (consumer, stop, ring) = (consumer.clone(), stop.clone(), ring.clone());
            let room = room.clone();
            let name = format!("{service}-poll");
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let wake = Wake { ring, wake, room };
                    poll_loop(&consumer, &tx, &stop, wake)
                })
                .expect("poll thread starts")
        };
        Ok(Self {
            consumer: Some(consumer),
            events: rx,
            received: Vec::new().into_iter(),
            stop,
            ring,
            room,
            thread: Some(thread),
            close_timeout: revoke_timeout,
        })
    }

    /// Tells the polling thread to stop, waking it if it sleeps.
    fn stop_polling(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.ring.try_send(());
    }

    /// The next event, in order; `None` once the polling thread has stopped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<SourceEvent> {
        if let Some(m) = self.received.next() {
            return Some(SourceEvent::Message(m));
        }
        let handoff = self.events.recv().await?;
        Some(self.unpack(handoff))
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<SourceEvent> {
        if let Some(m) = self.received.next() {
            return Some(SourceEvent::Message(m));
        }
        let handoff = self.events.try_recv().ok()?;
        Some(self.unpack(handoff))
    }

    fn unpack(&mut self, handoff: Handoff) -> SourceEvent {
        if let Handoff::Messages(_, bytes) = &handoff {
            self.room.taken(*bytes);
        }
        self.room.made(self.room.free(self.events.capacity()));
        match handoff {
            Handoff::Event(e) => e,
            Handoff::Messages(chunk, _) => {
                self.received = chunk.into_iter();
                let first = self.received.next();
                SourceEvent::Message(first.expect("a turn hands on at least one record"))
            }
        }
    }

    /// Bytes of the records fetched and handed on to the service, not yet taken by it:
    /// at most about 8 MiB plus a record, whatever the records' sizes.
    pub fn prefetched_bytes(&self) -> usize {
        self.room.held.load(Ordering::Relaxed)
    }

    pub fn consumer(&self) -> &Arc<SourceConsumer> {
        self.consumer.as_ref().expect("source is open")
    }

    /// Stops polling and leaves the group, waiting at most the drain timeout: past it the
    /// close goes on in the background and the group expires the member if it must.
    /// Commit before calling this.
    pub async fn close(mut self) {
        self.stop_polling();
        self.events.close();
        let service = self.consumer().context().service.clone();
        let (closed, wait) = tokio::sync::oneshot::channel();
        self.close_in_background(move || {
            let _ = closed.send(());
        });
        if tokio::time::timeout(self.close_timeout, wait)
            .await
            .is_err()
        {
            tracing::warn!(service = %service, timeout = ?self.close_timeout, "consumer did not leave its group in time; closing it in the background");
        }
    }

    /// Joins the polling thread, leaves the group and drops the last reference to the
    /// consumer (librdkafka's close) on a thread of its own, then calls `done`.
    fn close_in_background(&mut self, done: impl FnOnce() + Send + 'static) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let poll = self.thread.take();
        let closing = move || {
            if let Some(t) = poll {
                let _ = t.join();
            }
            consumer.unsubscribe();
            // A commit in flight holds a clone for a moment; the close runs where the
            // last reference goes, so wait for it here.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&consumer) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(consumer);
            done();
        };
        if let Err(e) = std::thread::Builder::new()
            .name("source-close".into())
            .spawn(closing)
        {
            tracing::warn!(error = %e, "no thread to close a consumer on");
        }
    }
}

/// Messages taken from one partition's queue per turn, so a busy partition cannot
/// starve the others; also the most records handed on in one send.
const TURN: usize = 512;

/// About how many fetched records wait for the service in the channel (plus a turn's
/// worth being handed out, and one turn's in `pending`): the prefetch that bounds a
/// service's memory beside librdkafka's own queues.
const PREFETCH: usize = 4096;

/// About how many bytes of records wait in the channel: any producer may write records
/// of a megabyte, and 4,096 of those would hold gigabytes. With the runner's
/// `max_in_flight_bytes` and librdkafka's `queued.max.messages.kbytes` it bounds what
/// a service holds of its input.
const PREFETCH_BYTES: usize = 8 << 20;
/// A turn is handed on once it holds this many bytes, so that one turn of large records
/// cannot take the whole prefetch.
const TURN_BYTES: usize = PREFETCH_BYTES / (PREFETCH / TURN);

/// How long an idle polling thread sleeps when nothing rings: it bounds a missed ring.
/// librdkafka rings a queue only when it goes from empty to not empty, and the thread
/// empties every queue it serves before it sleeps.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long the thread waits while the consumer's queue holds more than a turn's events.
const FULL_WAIT: Duration = Duration::from_millis(2);
/// Free turns in the channel at which the service rings a thread waiting for room.
const ROOM: usize = PREFETCH / TURN / 2;

/// The polling thread's doorbell: the consumer's queue, each partition's queue, the
/// service when it made room ([`RoomBell`]), `close` and `drop` ring it.
struct Wake {
    ring: std_mpsc::SyncSender<()>,
    wake: std_mpsc::Receiver<()>,
    room: Arc<RoomBell>,
}

/// How a polling thread that has no room in the channel learns the service made some.
/// The ring replaces a timer: retrying every few milliseconds while the service had no
/// room cost a wake-up and a copy of the waiting turn each time.
struct RoomBell {
    /// Set while the thread waits for room.
    wanted: AtomicBool,
    ring: std_mpsc::SyncSender<()>,
    /// Bytes of the records handed on and not yet taken by the service.
    held: AtomicUsize,
}

impl RoomBell {
    fn new(ring: std_mpsc::SyncSender<()>) -> Self {
        Self {
            wanted: AtomicBool::new(false),
            ring,
            held: AtomicUsize::new(0),
        }
    }

    fn handed(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    fn taken(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether the channel holds its bytes' worth: nothing more is handed on.
    fn over(&self) -> bool {
        self.held.load(Ordering::Relaxed) >= PREFETCH_BYTES
    }

    /// The channel's free turns, `capacity`, while it holds at most half its bytes'
    /// worth; none past that, so a thread stopped by bytes waits, like one stopped by
    /// count, until half the room is free.
    fn free(&self, capacity: usize) -> usize {
        if self.held.load(Ordering::Relaxed) > PREFETCH_BYTES / 2 {
            0
        } else {
            capacity
        }
    }

    /// The thread is about to sleep for room; false when `free()` turns (read after the
    /// mark) are already enough, so it must not.
    fn want(&self, free: impl FnOnce() -> usize) -> bool {
        self.wanted.store(true, Ordering::Relaxed);
        // Pairs with the fence in `made`: either the service sees the mark, or the thread
        // sees the room it made.
        std::sync::atomic::fence(Ordering::SeqCst);
        if free() >= ROOM {
            self.wanted.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The thread is awake again.
    fn woke(&self) {
        self.wanted.store(false, Ordering::Relaxed);
    }

    /// The service took a turn and `free` turns are free: rings a waiting thread once
    /// [`ROOM`] are, so it refills them at once rather than waking for every turn.
    fn made(&self, free: usize) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if free >= ROOM
            && self.wanted.load(Ordering::Relaxed)
            && self.wanted.swap(false, Ordering::AcqRel)
        {
            let _ = self.ring.try_send(());
        }
    }
}

/// Moves to `chunk` the records of one partition's batch that `check` takes (`None`:
/// dropped before any step), in order, and says whether it sought back to a gap: what
/// follows the seek in the batch was fetched before it and is dropped unchecked, to be
/// read again (librdkafka drops what its queue still holds of that fetch).
fn sift<M>(
    taken: impl IntoIterator<Item = Result<M, String>>,
    chunk: &mut Vec<M>,
    mut check: impl FnMut(M) -> Option<(M, Step)>,
    mut error: impl FnMut(String),
) -> bool {
    for polled in taken {
        match polled.map(&mut check) {
            Ok(Some((m, step))) if step.takes() => chunk.push(m),
            Ok(Some((_, Step::Refetch(_)))) => return true,
            Ok(_) => {}
            Err(e) => error(e),
        }
    }
    false
}

/// The polling thread: serve the consumer's events, split off each assigned partition's
/// queue, and hand messages on while the service has room.
fn poll_loop(
    consumer: &Arc<SourceConsumer>,
    tx: &mpsc::Sender<Handoff>,
    stop: &AtomicBool,
    Wake { ring, wake, room }: Wake,
) {
    let ctx = consumer.context();
    let events = EventQueue::consumer(consumer.client(), ring.clone())
        .expect("a source's consumer has a group");
    // Each partition's queue, and the mean size of the records last taken from it: a
    // take asks for no more of them than fill a turn's bytes (the first take, one), so
    // a partition prefetching megabyte records (a raised `queued.max.messages.kbytes`)
    // is not moved out of librdkafka all at once.
    let mut queues: HashMap<(String, i32), (RecordQueue<'_>, usize)> = HashMap::new();
    let mut taken = Vec::with_capacity(TURN);
    let keep = ctx.headers == RecordHeaders::Keep;
    let mut continuity: HashMap<(String, i32), Continuity> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        // Events (rebalances, errors), and messages fetched before their partition's
        // queue was split off: those are older than anything in that queue. `poll`
        // answers None for a rebalance or a commit result served, whatever lies behind
        // it, so the queue's length says when it is empty.
        for _ in 0..TURN {
            if events.is_empty() {
                break;
            }
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    if let Some(m) = ctx.admit(ctx.detach(&m)) {
                        let key = (m.topic().to_string(), m.partition());
                        if ctx
                            .follows(consumer, continuity.entry(key).or_default(), &m)
                            .takes()
                        {
                            ctx.pending.lock().expect("source lock").push_back(m);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(service = %ctx.service, error = %e, "consumer error")
                }
                None => {}
            }
        }
        for key in ctx.revoked.lock().expect("source lock").drain(..) {
            queues.remove(&key);
            continuity.remove(&key);
        }
        let assigned: Vec<(String, i32)> = ctx
            .assigned
            .lock()
            .expect("source lock")
            .drain(..)
            .collect();
        ctx.confirm_floors(consumer, &assigned);
        ctx.verify_held(consumer);
        for (topic, partition) in assigned {
            match RecordQueue::split(consumer.client(), &topic, partition, keep, ring.clone()) {
                Some(q) => {
                    continuity.entry((topic.clone(), partition)).or_default();
                    queues.insert((topic, partition), (q, TURN_BYTES));
                }
                None => {
                    tracing::warn!(service = %ctx.service, %topic, partition, "cannot split the partition's queue")
                }
            }
        }
        if !ctx.forward(tx, &room) {
            break;
        }
        // Whether a partition's queue gave anything, handed on or not: one left with
        // records after a turn (all dropped below a floor, say) rings no more.
        let mut took = false;
        let mut full = !ctx.pending.lock().expect("source lock").is_empty();
        let mut chunk = Vec::with_capacity(TURN);
        let mut chunk_bytes = 0;
        'queues: for (key, (q, record_bytes)) in &mut queues {
            if full {
                break;
            }
            if ctx.holding(key) {
                continue;
            }
            let Some(c) = continuity.get_mut(key) else {
                continue;
            };
            // At most a turn from each queue, taken no faster than the chunk fills.
            let mut from_queue = 0;
            while from_queue < TURN {
                let want = (TURN - from_queue)
                    .min(TURN - chunk.len())
                    .min((TURN_BYTES / *record_bytes).max(1));
                let got = q.take(want, &mut taken);
                if got == 0 {
                    break;
                }
                took = true;
                from_queue += got;
                let before = chunk.len();
                let sought = sift(
                    taken.drain(..),
                    &mut chunk,
                    |m| {
                        let m = ctx.admit(m)?;
                        let step = ctx.follows(consumer, c, &m);
                        Some((m, step))
                    },
                    |e| tracing::warn!(service = %ctx.service, error = %e, "consumer error"),
                );
                let bytes: usize = chunk[before..].iter().map(size).sum();
                *record_bytes = (bytes / (chunk.len() - before).max(1)).max(1);
                chunk_bytes += bytes;
                if chunk.len() >= TURN || chunk_bytes >= TURN_BYTES {
                    let turn = std::mem::replace(&mut chunk, Vec::with_capacity(TURN));
                    match ctx.hand_on(tx, &room, turn, std::mem::take(&mut chunk_bytes)) {
                        Taken::Yes => {}
                        Taken::Full => {
                            full = true;
                            continue 'queues;
                        }
                        Taken::Gone => break 'queues,
                    }
                }
                if sought || got < want {
                    break;
                }
            }
        }
        if !chunk.is_empty() && ctx.hand_on(tx, &room, chunk, chunk_bytes) == Taken::Full {
            full = true;
        }
        if !took {
            // Events waiting: served again soon. Holding: the group is asked again on a
            // timer. No room: the service rings once it made some. Idle: every queue
            // rings when something arrives.
            let wait = if !events.is_empty() {
                FULL_WAIT
            } else if ctx.holds_any() {
                ASK_EVERY
            } else {
                IDLE_WAIT
            };
            if full && !room.want(|| room.free(tx.capacity())) {
                continue;
            }
            let _ = wake.recv_timeout(wait);
            room.woke();
        }
    }
    drop(queues);
    // Rebalances during close have no one left to drain for them.
    ctx.events.lock().expect("source lock").take();
}

impl Drop for Source {
    /// Dropped without `close` (a failed stage): stop polling, and close off the runtime.
    fn drop(&mut self) {
        self.stop_polling();
        self.close_in_background(|| {});
    }
}

/// Inputs and what became of the work they wait for.
type AckFuture = BoxFuture<'static, Vec<(Vec<OwnedMessage>, Result<(), Failure>)>>;

/// Input offsets waiting for their outputs' acknowledgements, and the bytes they hold.
pub struct Acks {
    tracker: OffsetTracker,
    pending: FuturesUnordered<AckFuture>,
    bytes: usize,
    dlq: DlqWriter,
    /// Whether the last commit failed, so a long outage logs once, not every interval.
    commit_failing: bool,
}

/// What librdkafka keeps per header besides its name and value.
const HEADER_OVERHEAD: usize = 48;

/// What an input holds in memory: key, value and the headers a stage keeps (any
/// producer may send a megabyte of them with an empty value), each header with its
/// bookkeeping, so that a flood of empty ones counts too.
fn size(m: &OwnedMessage) -> usize {
    use rdkafka::message::Headers;
    let headers = m.headers().map_or(0, |h| {
        h.iter()
            .map(|h| HEADER_OVERHEAD + h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len) + headers
}

impl Acks {
    /// `dlq` receives inputs whose output can never be delivered.
    pub fn new(dlq: DlqWriter) -> Self {
        Self {
            tracker: OffsetTracker::default(),
            pending: FuturesUnordered::new(),
            bytes: 0,
            dlq,
            commit_failing: false,
        }
    }

    /// A message was read; its offset must not be committed until acknowledged.
    /// Returns the bytes it holds.
    pub fn track(&mut self, m: &OwnedMessage) -> usize {
        let bytes = size(m);
        self.bytes += bytes;
        self.tracker.track(m.topic(), m.partition(), m.offset());
        bytes
    }

    /// `inputs` are done once `work` resolves `Ok`. Poison dead-letters them (e.g. a
    /// reply topic that refuses writes); any other error stops the service uncommitted.
    pub fn wait_for<F>(&mut self, inputs: Vec<OwnedMessage>, work: F)
    where
        F: Future<Output = Result<(), Failure>> + Send + 'static,
    {
        self.pending
            .push(Box::pin(async move { vec![(inputs, work.await)] }));
    }

    /// Each part's inputs are done once all of that part's outputs are delivered; a
    /// delivery refused for good dead-letters them.
    pub fn wait_for_reports(&mut self, reported: Reported<Vec<OwnedMessage>>) {
        self.pending.push(Box::pin(async move {
            reported
                .await
                .into_iter()
                .map(|(inputs, r)| (inputs, r.map_err(|e| Failure::from_produce(&e))))
                .collect()
        }));
    }

    /// Dead-letters `m`; its offset is acknowledged once the dead letter is.
    pub fn dead_letter(&mut self, m: OwnedMessage, class: ErrorClass, message: String) {
        let dlq = self.dlq.clone();
        // Held until the letter is acknowledged, beside the input it quotes.
        let message = crate::dlq::cut_reason(message);
        self.pending.push(Box::pin(async move {
            let letter = DeadLetter {
                class,
                message,
                source_topic: m.topic(),
                source_partition: m.partition(),
                source_offset: m.offset(),
                key: m.key(),
                value: m.payload(),
            };
            let sent = dlq
                .send(&letter)
                .await
                .map_err(|e| Failure::fatal(format!("dead letter not written: {e}")));
            vec![(vec![m], sent)]
        }));
    }

    /// An input whose work is done synchronously (e.g. written to Redis).
    pub fn done(&mut self, m: &OwnedMessage) {
        self.bytes = self.bytes.saturating_sub(size(m));
        self.tracker.ack(m.topic(), m.partition(), m.offset());
    }

    /// Inputs read and not yet acknowledged: being worked on, or waiting for output.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// The key, value and kept header bytes of those inputs.
    pub fn in_flight_bytes(&self) -> usize {
        self.bytes
    }

    /// Resolves the next acknowledgement; `None` when nothing is pending. An error means
    /// output was not acknowledged after the producer's own retries: the service must
    /// stop without committing it, so a restart replays it.
    pub async fn next(&mut self) -> Option<Result<(), Failure>> {
        for (inputs, result) in self.pending.next().await? {
            match result {
                Ok(()) => {
                    for m in &inputs {
                        self.done(m);
                    }
                }
                Err(Failure::Poison { class, message }) => {
                    tracing::warn!(%class, inputs = inputs.len(), "output refused for good; dead-lettering its inputs");
                    for m in inputs {
                        self.dead_letter(m, class, message.clone());
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    /// Waits for every pending acknowledgement.
    pub async fn drain(&mut self) -> Result<(), Failure> {
        while let Some(r) = self.next().await {
            r?;
        }
        Ok(())
    }

    /// Commits everything acknowledged so far. A failed commit (no coordinator while
    /// the broker is away, a group mid-rebalance) is not a reason to stop: the offsets
    /// stay uncommitted, the next commit carries them, and at worst they are replayed.
    pub async fn commit(&mut self, consumer: &Arc<SourceConsumer>) {
        let Some(tpl) = self.tracker.committable() else {
            return;
        };
        crate::failpoint::hit!(crate::failpoint::AFTER_PRODUCE_BEFORE_COMMIT);
        let c = consumer.clone();
        let list = tpl.clone();
        match tokio::task::spawn_blocking(move || c.commit(&list, CommitMode::Sync))
            .await
            .expect("commit task")
        {
            Ok(()) => {
                self.tracker.committed(&tpl);
                if std::mem::take(&mut self.commit_failing) {
                    tracing::info!(service = %consumer.context().service, "offset commits succeed again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.commit_failing, true) {
                    tracing::warn!(service = %consumer.context().service, error = %e, "offset commit failed; retrying at every commit interval");
                }
            }
        }
    }

    /// Lets revoked partitions go: waits for their acknowledgements, commits, forgets
    /// them, then lets the rebalance proceed. Flush open work for them first.
    pub async fn release(
        &mut self,
        consumer: &Arc<SourceConsumer>,
        partitions: &[(String, i32)],
        done: std_mpsc::SyncSender<()>,
    ) -> anyhow::Result<()> {
        // What was acknowledged is committed even when something was not: the
        // tracker only lets a commit reach acknowledged inputs.
        let drained = self.drain().await;
        self.commit(consumer).await;
        drained?;
        self.forget(partitions);
        let _ = done.send(());
        Ok(())
    }

    /// At shutdown: waits for every acknowledgement, commits what was acknowledged, and
    /// leaves the group.
    pub async fn finish(mut self, source: Source) -> anyhow::Result<()> {
        let drained = self.drain().await;
        self.commit(source.consumer()).await;
        drained?;
        source.close().await;
        Ok(())
    }

    /// Forgets partitions this member no longer owns.
    pub fn forget(&mut self, partitions: &[(String, i32)]) {
        for (t, p) in partitions {
            self.tracker.forget(t, *p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Continuity, PREFETCH, PREFETCH_BYTES, REFETCH_EVERY, ROOM, RoomBell, Step, TURN,
        TURN_BYTES, Verdict, sift, verdict,
    };
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn an_inputs_size_counts_the_headers_it_keeps() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let message = |headers| {
            OwnedMessage::new(
                Some(b"value".to_vec()),
                Some(b"key".to_vec()),
                "t".into(),
                Timestamp::NotAvailable,
                0,
                0,
                headers,
            )
        };
        assert_eq!(super::size(&message(None)), 8);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "big",
                value: Some(&[0u8; 1000][..]),
            })
            .insert(Header::<&[u8]> {
                key: "none",
                value: None,
            });
        assert_eq!(
            super::size(&message(Some(headers))),
            8 + 2 * super::HEADER_OVERHEAD + 3 + 1000 + 4
        );
    }

    /// A thread waiting for room is rung once, when half the channel is free; a thread
    /// that is not waiting, or finds the room already made, is not.
    #[test]
    fn a_thread_waiting_for_room_is_rung_once_half_the_channel_is_free() {
        let (ring, rings) = mpsc::sync_channel(1);
        let bell = RoomBell::new(ring);
        bell.made(ROOM);
        assert!(rings.try_recv().is_err(), "no one waits: no ring");

        assert!(bell.want(|| 0), "no room: the thread sleeps");
        for free in 1..ROOM {
            bell.made(free);
            assert!(rings.try_recv().is_err(), "{free} free turns: not yet");
        }
        bell.made(ROOM);
        assert!(rings.try_recv().is_ok(), "half free: rung");
        bell.made(ROOM + 1);
        assert!(rings.try_recv().is_err(), "rung once per wait");

        assert!(!bell.want(|| ROOM), "room made before it slept: it goes on");
        bell.made(ROOM);
        assert!(rings.try_recv().is_err(), "and is not rung for it");

        assert!(bell.want(|| 0));
        bell.woke();
        bell.made(ROOM);
        assert!(rings.try_recv().is_err(), "woken otherwise: no ring");
    }

    /// Past its bytes' worth the channel takes nothing more, and a thread waiting for
    /// room is rung only once half of those bytes are taken, as for half its turns.
    #[test]
    fn the_channel_is_full_at_its_bytes_as_at_its_count() {
        let (ring, rings) = mpsc::sync_channel(1);
        let bell = RoomBell::new(ring);
        let turns = PREFETCH / TURN;
        bell.handed(PREFETCH_BYTES - 1);
        assert!(!bell.over());
        assert_eq!(
            bell.free(turns),
            0,
            "over half the bytes: no room to ring for"
        );
        bell.handed(1);
        assert!(bell.over(), "a turn of big records fills it");
        assert!(bell.want(|| bell.free(turns - 1)), "the thread sleeps");
        bell.taken(PREFETCH_BYTES / 4);
        bell.made(bell.free(turns));
        assert!(rings.try_recv().is_err(), "three quarters held: not yet");
        bell.taken(PREFETCH_BYTES / 4);
        assert!(!bell.over());
        bell.made(bell.free(ROOM));
        assert!(
            rings.try_recv().is_ok(),
            "half held, half the turns free: rung"
        );
        assert_eq!(TURN_BYTES * turns, PREFETCH_BYTES);
    }

    #[test]
    fn a_gap_in_offsets_is_fetched_again_until_it_fills_or_the_wait_runs_out() {
        let wait = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = Continuity::default();
        assert_eq!(
            c.step(10, wait, || at(0)),
            Step::Take,
            "the first record starts it"
        );
        assert_eq!(c.step(11, wait, || at(0)), Step::Take);
        // Batch 12..14 not visible yet, 15 listed: fetch again from 12.
        assert_eq!(c.step(15, wait, || at(1)), Step::Refetch(12));
        assert_eq!(
            c.step(16, wait, || at(2)),
            Step::Drop,
            "the rest of that fetch waits"
        );
        let again = 1 + REFETCH_EVERY.as_millis() as u64;
        assert_eq!(
            c.step(15, wait, || at(again)),
            Step::Refetch(12),
            "still missing"
        );
        // Now it is there; what the first fetch delivered comes again and is taken once.
        for o in 12..=16 {
            assert_eq!(c.step(o, wait, || at(again + 1)), Step::Take, "offset {o}");
        }
        assert_eq!(
            c.step(14, wait, || at(again + 2)),
            Step::Drop,
            "read already"
        );
        // A gap that never fills is stepped over after the wait, and said so.
        assert_eq!(c.step(20, wait, || at(100)), Step::Refetch(17));
        assert_eq!(
            c.step(20, wait, || at(1100)),
            Step::Skip { from: 17, to: 20 }
        );
        assert_eq!(c.step(21, wait, || at(1100)), Step::Take);
        // Off: everything is taken as it comes.
        let mut off = Continuity::default();
        for o in [5, 9, 7] {
            assert_eq!(off.step(o, Duration::ZERO, || at(0)), Step::Take);
        }
    }

    #[test]
    fn a_held_partition_is_released_only_when_nothing_can_have_been_skipped() {
        // The group committed 150 and the broker's first record is 150, or an earlier
        // one (a rewind by librdkafka): hand on from 150.
        assert_eq!(
            verdict(150, Some(150), None, 1000, false),
            Verdict::Release { floor: 150 }
        );
        assert_eq!(
            verdict(120, Some(150), None, 1000, true),
            Verdict::Release { floor: 150 }
        );
        // The broker answered from the next record batch: read again from before 150.
        assert_eq!(
            verdict(200, Some(150), None, 100, false),
            Verdict::Rewind {
                start: 50,
                floor: 150
            }
        );
        assert_eq!(
            verdict(200, Some(150), None, 1000, false),
            Verdict::Rewind {
                start: 0,
                floor: 150
            }
        );
        // No committed offset: only the log's first record proves nothing was skipped.
        assert_eq!(
            verdict(40, None, Some(40), 1000, false),
            Verdict::Release { floor: 40 }
        );
        assert_eq!(verdict(200, None, Some(40), 1000, false), Verdict::Wait);
        assert_eq!(verdict(200, None, None, 1000, false), Verdict::Wait);
        // Unknown for too long: replay rather than risk a gap.
        assert_eq!(
            verdict(200, None, Some(40), 100, true),
            Verdict::Replay { start: 100 }
        );
        assert_eq!(
            verdict(200, None, None, 1000, true),
            Verdict::Replay { start: 0 }
        );
    }

    /// A batch is handed on up to a seek back to a gap: what follows the seek was
    /// fetched before it and is not checked (each such record could seek again).
    #[test]
    fn a_batch_stops_at_a_seek_back_to_a_gap() {
        let taken = || -> Vec<Result<i64, String>> {
            vec![Ok(10), Ok(11), Err("broken".into()), Ok(13), Ok(14), Ok(15)]
        };
        let steps = |offset: i64| match offset {
            11 => Step::Drop,
            13 => Step::Refetch(12),
            _ => Step::Take,
        };
        let (mut chunk, mut checked, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let sought = sift(
            taken(),
            &mut chunk,
            |m| {
                checked.push(m);
                Some((m, steps(m)))
            },
            |e| errors.push(e),
        );
        assert!(sought);
        assert_eq!(chunk, [10]);
        assert_eq!(checked, [10, 11, 13], "nothing after the seek is checked");
        assert_eq!(errors, ["broken"]);

        // Without a gap every record checked is taken, dropped or refused before its step.
        let mut chunk = Vec::new();
        let sought = sift(
            taken(),
            &mut chunk,
            |m| (m != 14).then_some((m, if m == 11 { Step::Drop } else { Step::Take })),
            |_| {},
        );
        assert!(!sought);
        assert_eq!(chunk, [10, 13, 15]);
    }
}
