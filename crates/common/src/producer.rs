//! The producer every Lanes process writes with, and how its delivery reports reach the
//! code waiting for them.
//!
//! rdkafka's `FutureProducer` gives each message a oneshot channel and wakes a task per
//! report. A stage that produces thousands of outputs per poll does not need that: its
//! inputs are done when *all* the outputs they caused are acknowledged. So outputs are
//! produced as parts of a [`Group`]: each report decrements the group's count on the
//! producer's polling thread, and the task waiting for the group is woken once, when the
//! last report is in. A single record can still be awaited on its own ([`Producer::send`]).
//!
//! The polling thread is Lanes' own, not rdkafka's `ThreadedProducer`: that one polls
//! with a 100 ms timeout whose last millisecond it spins through (the time left is
//! rounded down to whole milliseconds, so under 1 ms it polls with 0 in a loop), about
//! 1% of a core on an idle process. This thread sleeps until librdkafka rings it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::oneshot;
use futures::task::AtomicWaker;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureRecord, NoCustomPartitioner, Producer as _,
    ProducerContext,
};
use rdkafka::{ClientContext, Statistics};

use crate::config::KafkaConfig;
use crate::queue::EventQueue;

/// Who waits for a message's delivery report.
pub struct Ticket(Waiter);

enum Waiter {
    /// A part of a group of outputs.
    Part(PartWaiter),
    /// One caller, for one record.
    One(oneshot::Sender<KafkaResult<(i32, i64)>>),
}

/// An output's claim on its group. Released when dropped: after its report, or with its
/// record when that never reached librdkafka (refused, or its enqueue was cancelled), so
/// a group always resolves.
struct PartWaiter {
    group: Arc<GroupState>,
    part: u32,
}

impl PartWaiter {
    fn failed(&self, e: KafkaError) {
        self.group
            .failures
            .lock()
            .expect("group lock")
            .push((self.part, e));
    }
}

impl Drop for PartWaiter {
    fn drop(&mut self) {
        self.group.release();
    }
}

/// Routes delivery reports to their tickets.
pub struct Reports;

impl ClientContext for Reports {
    fn stats(&self, _: Statistics) {}
}

impl ProducerContext<NoCustomPartitioner> for Reports {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        match ticket.0 {
            Waiter::Part(waiter) => {
                if let Err((e, _)) = result {
                    waiter.failed(e.clone());
                }
            }
            Waiter::One(tx) => {
                let _ = tx.send(match result {
                    Ok(m) => Ok((m.partition(), m.offset())),
                    Err((e, _)) => Err(e.clone()),
                });
            }
        }
    }
}

/// The longest wait between tries to enqueue into librdkafka's full queue.
const QUEUE_FULL_MAX_WAIT: Duration = Duration::from_millis(64);

/// An idempotent producer with a polling thread for its delivery reports. Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Polled>,
}

/// A producer and the thread serving its event queue; the thread stops when the last
/// clone is dropped, before the producer is (which then flushes what it can).
struct Polled {
    producer: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
    ring: mpsc::SyncSender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for Polled {
    type Target = BaseProducer<Reports>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.ring.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the producer's polling thread panicked");
        }
    }
}

/// Serves `producer`'s events until `stop`: everything queued, then sleep until rung.
fn poll_loop(
    producer: &BaseProducer<Reports>,
    events: &EventQueue<'_>,
    wake: &mpsc::Receiver<()>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        while !events.is_empty() {
            // One event per call, with no timeout to round down.
            producer.poll(Duration::ZERO);
        }
        // The timeout only bounds a missed ring.
        let _ = wake.recv_timeout(Duration::from_secs(1));
    }
}

impl Producer {
    pub fn new(producer: BaseProducer<Reports>) -> Self {
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        let (ring, wake) = mpsc::sync_channel(1);
        let thread = {
            let (producer, stop, ring) = (producer.clone(), stop.clone(), ring.clone());
            std::thread::Builder::new()
                .name("lanes-produce".into())
                .spawn(move || {
                    let events = EventQueue::main(producer.client(), ring);
                    poll_loop(&producer, &events, &wake, &stop);
                })
                .expect("producer polling thread starts")
        };
        Self {
            inner: Arc::new(Polled {
                producer,
                stop,
                ring,
                thread: Some(thread),
            }),
        }
    }

    /// The rdkafka producer, for what this type does not wrap (flush, metadata).
    pub fn inner(&self) -> &BaseProducer<Reports> {
        &self.inner
    }

    /// Hands `record` to librdkafka, waiting only while its queue is full. A record it
    /// refuses outright (too large, unknown partition) is returned as the error.
    async fn enqueue<K, P>(&self, record: FutureRecord<'_, K, P>, ticket: Ticket) -> KafkaResult<()>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let mut base = BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: record.timestamp,
            headers: record.headers,
            delivery_opaque: Box::new(ticket),
        };
        // Full while the broker is slow or away: waits double up to a cap, so an
        // outage is not a wake-up every millisecond.
        let mut wait = Duration::from_millis(1);
        loop {
            match self.inner.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    base = r;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(QUEUE_FULL_MAX_WAIT);
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Enqueues `record` and returns the wait for its own delivery report.
    pub async fn enqueue_one<K, P>(&self, record: FutureRecord<'_, K, P>) -> KafkaResult<Delivery>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        self.enqueue(record, Ticket(Waiter::One(tx))).await?;
        Ok(Delivery(rx))
    }

    /// Produces `record` and waits for the broker's answer: its partition and offset.
    pub async fn send<K, P>(&self, record: FutureRecord<'_, K, P>) -> KafkaResult<(i32, i64)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        self.enqueue_one(record).await?.await
    }

    /// Enqueues `record` as an output of `group`'s current part.
    pub async fn enqueue_part<K, P, T>(
        &self,
        group: &mut Group<T>,
        record: FutureRecord<'_, K, P>,
    ) -> KafkaResult<()>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let ticket = group.ticket();
        self.enqueue(record, ticket).await?;
        group.open_outputs += 1;
        Ok(())
    }

    /// Waits up to `timeout` for every queued message to be delivered.
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.inner.flush(timeout)
    }
}

/// Producers shared by the services of one process: one per distinct client
/// configuration, so `lanes up` runs one polling thread, one set of broker connections
/// and fuller produce requests, not one of each per service. A service whose
/// `kafka.services` properties differ gets its own.
#[derive(Clone)]
pub struct Producers {
    client_id: String,
    shared: Arc<Mutex<HashMap<String, Producer>>>,
}

impl Producers {
    /// Producers created here identify themselves as `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            shared: Arc::default(),
        }
    }

    /// The producer for `cfg`, created on first use.
    pub fn get(&self, cfg: &KafkaConfig) -> KafkaResult<Producer> {
        let key = format!(
            "{}\n{:?}\n{:?}",
            cfg.bootstrap_servers, cfg.properties, cfg.producer_properties
        );
        let mut shared = self.shared.lock().expect("producers lock");
        if let Some(p) = shared.get(&key) {
            return Ok(p.clone());
        }
        let p = crate::kafka::service_producer(cfg, &self.client_id)?;
        shared.insert(key, p.clone());
        Ok(p)
    }
}

/// The wait for one record's delivery report.
pub struct Delivery(oneshot::Receiver<KafkaResult<(i32, i64)>>);

impl Future for Delivery {
    type Output = KafkaResult<(i32, i64)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(KafkaError::Canceled)))
    }
}

/// What the polling thread and the waiting task share.
struct GroupState {
    /// Reports still to come, plus one while the group is still being filled.
    outstanding: AtomicUsize,
    /// Failed reports by part, in arrival order.
    failures: Mutex<Vec<(u32, KafkaError)>>,
    waker: AtomicWaker,
}

impl GroupState {
    fn release(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }
}

/// Outputs produced in parts: each part is the outputs of some inputs, and what became
/// of those outputs decides what becomes of those inputs.
pub struct Group<T> {
    state: Arc<GroupState>,
    /// Each closed part: what it decides about, and whether its outputs' reports count.
    parts: Vec<(T, bool)>,
    /// Outputs enqueued since the last part closed.
    open_outputs: usize,
}

impl<T> Default for Group<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Group<T> {
    pub fn new() -> Self {
        Self {
            state: Arc::new(GroupState {
                outstanding: AtomicUsize::new(1),
                failures: Mutex::new(Vec::new()),
                waker: AtomicWaker::new(),
            }),
            parts: Vec::new(),
            open_outputs: 0,
        }
    }

    /// The ticket of one more output of the current part: its report is now awaited.
    fn ticket(&mut self) -> Ticket {
        self.state.outstanding.fetch_add(1, Ordering::Relaxed);
        Ticket(Waiter::Part(PartWaiter {
            group: self.state.clone(),
            part: self.parts.len() as u32,
        }))
    }

    /// Outputs enqueued since the last part closed.
    pub fn open_outputs(&self) -> usize {
        self.open_outputs
    }

    /// Closes the current part; its outputs' reports decide about `inputs`. With
    /// `counted` false the reports are ignored.
    pub fn close_part(&mut self, inputs: T, counted: bool) {
        self.parts.push((inputs, counted));
        self.open_outputs = 0;
    }

    /// Closes the current part with nothing to decide: its reports are ignored.
    pub fn abandon_part(&mut self)
    where
        T: Default,
    {
        self.close_part(T::default(), false);
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// No more outputs: the wait for every report. Parts resolve in the order closed.
    pub fn seal(self) -> Reported<T> {
        // Parts closed after their outputs: anything still open is reported on no one.
        let state = self.state;
        state.release();
        Reported {
            state,
            parts: self.parts,
        }
    }
}

/// Resolves, once every report of a sealed group is in, to each part's outcome: `Ok`, or
/// the first error among its outputs.
pub struct Reported<T> {
    state: Arc<GroupState>,
    parts: Vec<(T, bool)>,
}

impl<T: Unpin> Future for Reported<T> {
    type Output = Vec<(T, KafkaResult<()>)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.state.outstanding.load(Ordering::Acquire) != 0 {
            self.state.waker.register(cx.waker());
            if self.state.outstanding.load(Ordering::Acquire) != 0 {
                return Poll::Pending;
            }
        }
        let mut failures = std::mem::take(&mut *self.state.failures.lock().expect("group lock"));
        let parts = std::mem::take(&mut self.parts);
        let mut outcome: Vec<_> = parts
            .into_iter()
            .map(|(inputs, counted)| (inputs, counted, Ok(())))
            .collect();
        for (part, e) in failures.drain(..) {
            if let Some((_, true, r @ Ok(()))) = outcome.get_mut(part as usize) {
                *r = Err(e);
            }
        }
        Poll::Ready(
            outcome
                .into_iter()
                .map(|(inputs, _, r)| (inputs, r))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// An output queued in `group`'s current part: its report is given by dropping it,
    /// after `failed` for a refusal.
    fn output(group: &mut Group<&'static str>) -> PartWaiter {
        let Ticket(Waiter::Part(waiter)) = group.ticket() else {
            unreachable!("a group hands out part tickets")
        };
        group.open_outputs += 1;
        waiter
    }

    fn report(waiter: PartWaiter, failure: Option<KafkaError>) {
        if let Some(e) = failure {
            waiter.failed(e);
        }
    }

    fn refused() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    }

    #[test]
    fn each_part_is_decided_by_its_own_outputs_once_all_are_reported() {
        let mut g = Group::new();
        let a1 = output(&mut g);
        let a2 = output(&mut g);
        g.close_part("a", true);
        let b1 = output(&mut g);
        g.close_part("b", true);
        g.close_part("c", true); // no outputs: done with the group
        let abandoned = output(&mut g);
        g.abandon_part();
        let d1 = output(&mut g);
        g.close_part("d", true);
        let mut reported = g.seal();
        report(a1, None);
        report(b1, None);
        report(abandoned, Some(refused()));
        report(a2, Some(refused()));
        assert!(
            (&mut reported).now_or_never().is_none(),
            "d's report is still out"
        );
        report(d1, None);
        let outcome = reported.now_or_never().expect("every report is in");
        let decided: Vec<(&str, bool)> = outcome.iter().map(|(p, r)| (*p, r.is_ok())).collect();
        assert_eq!(
            decided,
            vec![
                ("a", false),
                ("b", true),
                ("c", true),
                ("", true),
                ("d", true)
            ],
            "only a's refused output fails a; the abandoned output's failure decides nothing"
        );
    }

    #[test]
    fn services_with_the_same_client_settings_share_one_producer() {
        let mut cfg = crate::Settings::load_from(None, Default::default())
            .unwrap()
            .kafka;
        cfg.bootstrap_servers = "127.0.0.1:1".into();
        let pool = Producers::new("lanes-up");
        let (a, b) = (pool.get(&cfg).unwrap(), pool.get(&cfg).unwrap());
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        let mut own = cfg.clone();
        own.producer_properties
            .insert("linger.ms".into(), "0".into());
        let c = pool.get(&own).unwrap();
        assert!(
            !Arc::ptr_eq(&a.inner, &c.inner),
            "other properties, own producer"
        );
        let other_process = Producers::new("lanes-ingest").get(&cfg).unwrap();
        assert!(!Arc::ptr_eq(&a.inner, &other_process.inner));
    }

    #[test]
    fn an_output_whose_enqueue_never_finished_does_not_hold_its_group() {
        let mut g: Group<&str> = Group::new();
        let sent = output(&mut g);
        // Refused by librdkafka, or its enqueue future dropped while the queue was
        // full: the ticket goes away with the record, unreported.
        drop(g.ticket());
        g.close_part("x", true);
        let mut reported = g.seal();
        assert!((&mut reported).now_or_never().is_none());
        report(sent, None);
        let outcome = reported
            .now_or_never()
            .expect("resolved without the lost one");
        assert!(outcome[0].1.is_ok());
    }

    #[test]
    fn an_open_group_waits_for_its_seal_and_an_empty_one_resolves_at_once() {
        let mut g: Group<&str> = Group::new();
        report(output(&mut g), None);
        g.close_part("x", true);
        // Reported before the seal: not resolved until sealed.
        assert_eq!(g.state.outstanding.load(Ordering::Acquire), 1);
        let outcome = g.seal().now_or_never().expect("sealed with nothing out");
        assert_eq!(outcome.len(), 1);
        assert!(
            Group::<&str>::new()
                .seal()
                .now_or_never()
                .unwrap()
                .is_empty()
        );
    }
}
