//! A Kafka input for a service: a thread polls the consumer and hands messages and
//! rebalances to the service's async loop in order, and [`Acks`] commits an input offset
//! only after the output it caused is acknowledged.
//!
//! Backpressure, not eviction: each assigned partition gets its own librdkafka queue,
//! which the thread drains only while the service has room. When the service falls
//! behind (a dependency is down, its in-flight limit is reached) those queues are left
//! alone: librdkafka stops fetching once a partition holds `queued.max.messages.kbytes`,
//! while the thread keeps polling the consumer's own queue, so the member stays in its
//! group and rebalances are still served. Nothing is paused and nothing refetched: on
//! the embedded broker a fetch that starts inside a record batch skips the rest of that
//! batch, which a `pause()`/`resume()` would do every time.
//!
//! Assignment rewinds: each newly assigned partition starts `rewind_records` before its
//! committed offset and the thread drops what lies below it, because that broker also
//! answers a fetch starting mid-batch (a commit is usually mid-batch) from the next one.
//!
//! Revocation is synchronous: librdkafka calls the rebalance callback on the polling
//! thread, which sends [`SourceEvent::Revoked`] after every message already fetched from
//! those partitions, and waits until the service has flushed, drained and committed them
//! (or the drain deadline passes). Only then does the partition move to another member.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use crate::service::ConsumerMetrics;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::dlq::{DeadLetter, DlqWriter, ErrorClass};
use crate::error::Failure;
use crate::kafka::{OffsetTracker, describe};
use crate::producer::Reported;

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

/// How a newly assigned partition's first records are checked.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Read from `rewind_records` before the committed offset: records below it were
    /// done already and are dropped.
    Floor(i64),
    /// Assigned while the group's committed offset could not be read (a broker may not
    /// answer for a group in the middle of its rebalance): checked at the first record.
    Unverified,
}

pub struct SourceContext {
    service: String,
    metrics: Option<ConsumerMetrics>,
    events: Mutex<Option<mpsc::Sender<SourceEvent>>>,
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
    /// A client of the same group that never joins it, to read committed offsets from
    /// inside a rebalance callback (the member's own request waits for the rebalance).
    offsets: Option<BaseConsumer>,
    /// Newly assigned partitions whose first records are still to be checked.
    floors: Mutex<HashMap<(String, i32), Start>>,
    /// Whether `floors` has entries, so most messages skip its lock.
    rewinding: AtomicBool,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// How long a partition assigned without a known committed offset waits at its first
/// record for the broker to report one (see `SourceContext::skipped_from`).
const UNVERIFIED_WAIT: Duration = Duration::from_secs(3);

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
        }
    }

    /// Starts each partition of `tpl` with a committed offset `rewind` records earlier,
    /// and remembers that offset as the partition's floor.
    fn rewind(&self, tpl: &mut TopicPartitionList) {
        let Some(offsets) = self.offsets.as_ref().filter(|_| tpl.count() > 0) else {
            return;
        };
        let committed = match offsets.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "committed offsets unknown; starting at them without a rewind");
                return;
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

    /// False for a record below its partition's floor (read again by the rewind); the
    /// first record at or past the floor lifts it. A partition assigned without a known
    /// committed offset is checked at its first record: one past the committed offset
    /// means the broker skipped the rest of a record batch, and the partition is sought
    /// back by the rewind.
    fn admit<M: Message>(&self, consumer: &SourceConsumer, m: &M) -> bool {
        if !self.rewinding.load(Ordering::Relaxed) {
            return true;
        }
        let mut floors = self.floors.lock().expect("source lock");
        let key = (m.topic().to_string(), m.partition());
        let admit = match floors.get(&key).copied() {
            None => return true,
            Some(Start::Floor(floor)) if m.offset() < floor => return false,
            Some(Start::Floor(_)) => true,
            Some(Start::Unverified) => match self.skipped_from(m) {
                Some(committed) => {
                    let start = (committed - self.rewind).max(0);
                    match consumer.seek(
                        m.topic(),
                        m.partition(),
                        Offset::Offset(start),
                        Duration::from_secs(5),
                    ) {
                        Ok(()) => {
                            tracing::warn!(service = %self.service, topic = m.topic(), partition = m.partition(), committed, first = m.offset(), start, "the broker resumed past the committed offset; reading again from before it");
                            floors.insert(key, Start::Floor(committed));
                            return false;
                        }
                        Err(e) => {
                            tracing::error!(service = %self.service, topic = m.topic(), partition = m.partition(), committed, first = m.offset(), error = %e, "the broker resumed past the committed offset and the seek back failed; records between were skipped");
                            true
                        }
                    }
                }
                None => true,
            },
        };
        floors.remove(&key);
        self.rewinding.store(!floors.is_empty(), Ordering::Relaxed);
        admit
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

    /// The group's committed offset for `m`'s partition when `m` lies past it: the
    /// first record delivered there should have been that offset. tansu answers "none
    /// committed" while its group is still rebalancing, so an unknown offset is asked
    /// again for up to [`UNVERIFIED_WAIT`] before `m` is let through unchecked; a first
    /// record at offset 0 cannot have skipped anything.
    fn skipped_from<M: Message>(&self, m: &M) -> Option<i64> {
        let offsets = self.offsets.as_ref()?;
        if m.offset() <= 0 {
            return None;
        }
        let deadline = std::time::Instant::now() + UNVERIFIED_WAIT;
        loop {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(m.topic(), m.partition());
            let committed = offsets
                .committed_offsets(tpl, Duration::from_secs(5))
                .map_err(|e| tracing::warn!(service = %self.service, error = %e, "committed offset unknown; not checked"))
                .ok()?;
            match committed.find_partition(m.topic(), m.partition())?.offset() {
                Offset::Offset(c) if m.offset() > c => return Some(c),
                Offset::Offset(_) => return None,
                other if std::time::Instant::now() >= deadline => {
                    tracing::debug!(service = %self.service, topic = m.topic(), partition = m.partition(), committed = ?other, first = m.offset(), "no committed offset; first record not checked");
                    return None;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends `event`, waiting at most `timeout` for room; false if the service is gone
    /// or did not make room in time.
    fn send_within(&self, event: SourceEvent, timeout: Duration) -> bool {
        let Some(tx) = self.events.lock().expect("source lock").clone() else {
            return false;
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut event = event;
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

    /// Hands waiting messages on while the channel has room. Returns false once the
    /// service has gone away.
    fn forward(&self, tx: &mpsc::Sender<SourceEvent>) -> bool {
        let mut pending = self.pending.lock().expect("source lock");
        while let Some(m) = pending.pop_front() {
            match tx.try_send(SourceEvent::Message(m)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(SourceEvent::Message(m))) => {
                    pending.push_front(m);
                    break;
                }
                Err(_) => return false,
            }
        }
        true
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
    pub events: mpsc::Receiver<SourceEvent>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    close_timeout: Duration,
}

impl Source {
    /// Subscribes `group` to `topics`. `revoke_timeout` bounds how long a rebalance waits
    /// for the service to drain.
    pub fn start(
        cfg: &KafkaConfig,
        service: &str,
        group: &str,
        topics: &[&str],
        revoke_timeout: Duration,
        rewind_records: i64,
        metrics: Option<ConsumerMetrics>,
    ) -> KafkaResult<Self> {
        let (tx, rx) = mpsc::channel(4096);
        let context = SourceContext {
            service: service.to_string(),
            events: Mutex::new(Some(tx.clone())),
            pending: Mutex::new(VecDeque::new()),
            assigned: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
            owned: Mutex::new(HashSet::new()),
            revoke_timeout,
            rewind: rewind_records,
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
            metrics,
        };
        let consumer: SourceConsumer =
            crate::kafka::consumer_config(cfg, service, group).create_with_context(context)?;
        consumer.subscribe(topics)?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumer, stop) = (consumer.clone(), stop.clone());
            let name = format!("{service}-poll");
            std::thread::Builder::new()
                .name(name)
                .spawn(move || poll_loop(&consumer, &tx, &stop))
                .expect("poll thread starts")
        };
        Ok(Self {
            consumer: Some(consumer),
            events: rx,
            stop,
            thread: Some(thread),
            close_timeout: revoke_timeout,
        })
    }

    pub fn consumer(&self) -> &Arc<SourceConsumer> {
        self.consumer.as_ref().expect("source is open")
    }

    /// Stops polling and leaves the group, waiting at most the drain timeout: past it the
    /// close goes on in the background and the group expires the member if it must.
    /// Commit before calling this.
    pub async fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
/// starve the others.
const TURN: usize = 512;

/// The polling thread: serve the consumer's events, split off each assigned partition's
/// queue, and hand messages on while the service has room.
fn poll_loop(consumer: &Arc<SourceConsumer>, tx: &mpsc::Sender<SourceEvent>, stop: &AtomicBool) {
    let ctx = consumer.context();
    let mut queues: HashMap<(String, i32), PartitionQueue<SourceContext>> = HashMap::new();
    // Partition queues ring this when they get messages, so an idle source sleeps.
    let (wake_tx, wake) = std_mpsc::sync_channel::<()>(1);
    while !stop.load(Ordering::Relaxed) {
        // Events (rebalances, errors), and messages fetched before their partition's
        // queue was split off: those are older than anything in that queue.
        while let Some(polled) = consumer.poll(Duration::ZERO) {
            match polled {
                Ok(m) => {
                    let m = m.detach();
                    if ctx.admit(consumer, &m) {
                        ctx.pending.lock().expect("source lock").push_back(m);
                    }
                }
                Err(e) => tracing::warn!(service = %ctx.service, error = %e, "consumer error"),
            }
        }
        for key in ctx.revoked.lock().expect("source lock").drain(..) {
            queues.remove(&key);
        }
        let assigned: Vec<(String, i32)> = ctx
            .assigned
            .lock()
            .expect("source lock")
            .drain(..)
            .collect();
        ctx.confirm_floors(consumer, &assigned);
        for (topic, partition) in assigned {
            match consumer.split_partition_queue(&topic, partition) {
                Some(mut q) => {
                    let wake = wake_tx.clone();
                    q.set_nonempty_callback(move || {
                        let _ = wake.try_send(());
                    });
                    queues.insert((topic, partition), q);
                }
                None => {
                    tracing::warn!(service = %ctx.service, %topic, partition, "cannot split the partition's queue")
                }
            }
        }
        if !ctx.forward(tx) {
            break;
        }
        let mut moved = false;
        let mut full = !ctx.pending.lock().expect("source lock").is_empty();
        'queues: for q in queues.values() {
            if full {
                break;
            }
            for _ in 0..TURN {
                let Some(polled) = q.poll(Duration::ZERO) else {
                    break;
                };
                match polled {
                    Ok(m) if !ctx.admit(consumer, &m) => {}
                    Ok(m) => match tx.try_send(SourceEvent::Message(m.detach())) {
                        Ok(()) => moved = true,
                        Err(mpsc::error::TrySendError::Full(SourceEvent::Message(m))) => {
                            ctx.pending.lock().expect("source lock").push_back(m);
                            full = true;
                            continue 'queues;
                        }
                        Err(_) => break 'queues,
                    },
                    Err(e) => tracing::warn!(service = %ctx.service, error = %e, "consumer error"),
                }
            }
        }
        if !moved {
            // Full: the service may make room any moment. Idle: a queue rings when
            // messages arrive; events wait at most one idle turn.
            let wait = if full { 2 } else { 50 };
            let _ = wake.recv_timeout(Duration::from_millis(wait));
        }
    }
    drop(queues);
    // Rebalances during close have no one left to drain for them.
    ctx.events.lock().expect("source lock").take();
}

impl Drop for Source {
    /// Dropped without `close` (a failed stage): stop polling, and close off the runtime.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

fn size(m: &OwnedMessage) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len)
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
    pub fn track(&mut self, m: &OwnedMessage) {
        self.bytes += size(m);
        self.tracker.track(m.topic(), m.partition(), m.offset());
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

    /// The key and value bytes of those inputs.
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
        self.drain().await?;
        self.commit(consumer).await;
        self.forget(partitions);
        let _ = done.send(());
        Ok(())
    }

    /// At shutdown: waits for every acknowledgement, commits, and leaves the group.
    pub async fn finish(mut self, source: Source) -> anyhow::Result<()> {
        self.drain().await?;
        self.commit(source.consumer()).await;
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
