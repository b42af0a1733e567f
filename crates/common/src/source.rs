//! A Kafka input for a service: a thread polls the consumer and hands messages and
//! rebalances to the service's async loop in order, and [`Acks`] commits an input offset
//! only after the output it caused is acknowledged.
//!
//! Revocation is synchronous: librdkafka calls the rebalance callback on the polling
//! thread, which sends [`SourceEvent::Revoked`] after every message already fetched from
//! those partitions, and waits until the service has flushed, drained and committed them
//! (or the drain deadline passes). Only then does the partition move to another member.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use prometheus::IntGaugeVec;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::OwnedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::dlq::{DeadLetter, DlqWriter, ErrorClass};
use crate::kafka::{OffsetTracker, describe};

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

pub struct SourceContext {
    service: String,
    lag: Option<IntGaugeVec>,
    events: Mutex<Option<mpsc::Sender<SourceEvent>>>,
    revoke_timeout: Duration,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl SourceContext {
    fn send(&self, event: SourceEvent) -> bool {
        let tx = self.events.lock().expect("source lock").clone();
        tx.is_some_and(|tx| tx.blocking_send(event).is_ok())
    }
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics carry each assigned partition's lag.
    fn stats(&self, statistics: Statistics) {
        let Some(lag) = &self.lag else { return };
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal partition; a negative lag is unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.with_label_values(&[&self.service, topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions revoked, draining");
            let (done, wait) = std_mpsc::sync_channel(1);
            if self.send(SourceEvent::Revoked {
                partitions: partitions(tpl),
                done,
            }) && wait.recv_timeout(self.revoke_timeout).is_err()
            {
                tracing::warn!(service = %self.service, "revoked partitions not drained in time; their records will be replayed");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(service = %self.service, partitions = %describe(tpl), "partitions assigned");
                self.send(SourceEvent::Assigned(partitions(tpl)));
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
    pub consumer: Arc<SourceConsumer>,
    pub events: mpsc::Receiver<SourceEvent>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
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
        lag: Option<IntGaugeVec>,
    ) -> KafkaResult<Self> {
        let (tx, rx) = mpsc::channel(4096);
        let context = SourceContext {
            service: service.to_string(),
            events: Mutex::new(Some(tx.clone())),
            revoke_timeout,
            lag,
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
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(100)) {
                            Some(Ok(m))
                                if tx.blocking_send(SourceEvent::Message(m.detach())).is_err() =>
                            {
                                break;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                            None => {}
                        }
                    }
                    // Rebalances during close have no one left to drain for them.
                    consumer
                        .context()
                        .events
                        .lock()
                        .expect("source lock")
                        .take();
                })
                .expect("poll thread starts")
        };
        Ok(Self {
            consumer,
            events: rx,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops polling and leaves the group. Commit before calling this.
    pub async fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.events.close();
        if let Some(t) = self.thread.take() {
            let consumer = self.consumer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = t.join();
                consumer.unsubscribe();
            })
            .await;
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type AckFuture = BoxFuture<'static, (Vec<(String, i32, i64)>, Result<(), String>)>;

/// Input offsets waiting for their outputs' acknowledgements.
#[derive(Default)]
pub struct Acks {
    tracker: OffsetTracker,
    pending: FuturesUnordered<AckFuture>,
}

impl Acks {
    pub fn new() -> Self {
        Self::default()
    }

    /// A message was read; its offset must not be committed until acknowledged.
    pub fn track(&mut self, m: &OwnedMessage) {
        self.tracker.track(m.topic(), m.partition(), m.offset());
    }

    /// The output for `offsets` is acknowledged once `work` resolves `Ok`.
    pub fn wait_for<F>(&mut self, offsets: Vec<(String, i32, i64)>, work: F)
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.pending
            .push(Box::pin(async move { (offsets, work.await) }));
    }

    /// Dead-letters `m`; its offset is acknowledged once the dead letter is.
    pub fn dead_letter(
        &mut self,
        dlq: &DlqWriter,
        m: OwnedMessage,
        class: ErrorClass,
        message: String,
    ) {
        let dlq = dlq.clone();
        let offsets = vec![(m.topic().to_string(), m.partition(), m.offset())];
        self.wait_for(offsets, async move {
            let letter = DeadLetter {
                class,
                message,
                source_topic: m.topic(),
                source_partition: m.partition(),
                source_offset: m.offset(),
                key: m.key(),
                value: m.payload(),
            };
            dlq.send(&letter).await.map_err(|e| e.to_string())
        });
    }

    /// Offsets whose work is done synchronously (e.g. dropped tombstones).
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        self.tracker.ack(topic, partition, offset);
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Resolves the next acknowledgement; `None` when nothing is pending. An error means
    /// output was not acknowledged after the producer's own retries: the service must
    /// stop without committing it, so a restart replays it.
    pub async fn next(&mut self) -> Option<Result<(), String>> {
        let (offsets, result) = self.pending.next().await?;
        if result.is_ok() {
            for (t, p, o) in &offsets {
                self.tracker.ack(t, *p, *o);
            }
        }
        Some(result)
    }

    /// Waits for every pending acknowledgement.
    pub async fn drain(&mut self) -> Result<(), String> {
        while let Some(r) = self.next().await {
            r?;
        }
        Ok(())
    }

    /// Commits everything acknowledged so far.
    pub async fn commit(&mut self, consumer: &Arc<SourceConsumer>) -> KafkaResult<()> {
        let Some(tpl) = self.tracker.committable() else {
            return Ok(());
        };
        let c = consumer.clone();
        let list = tpl.clone();
        tokio::task::spawn_blocking(move || c.commit(&list, CommitMode::Sync))
            .await
            .expect("commit task")?;
        self.tracker.committed(&tpl);
        Ok(())
    }

    /// Lets revoked partitions go: waits for their acknowledgements, commits, forgets
    /// them, then lets the rebalance proceed. Flush open work for them first.
    pub async fn release(
        &mut self,
        consumer: &Arc<SourceConsumer>,
        partitions: &[(String, i32)],
        done: std_mpsc::SyncSender<()>,
    ) -> anyhow::Result<()> {
        self.drain().await.map_err(anyhow::Error::msg)?;
        self.commit(consumer).await?;
        self.forget(partitions);
        let _ = done.send(());
        Ok(())
    }

    /// At shutdown: waits for every acknowledgement, commits, and leaves the group.
    pub async fn finish(mut self, source: Source) -> anyhow::Result<()> {
        self.drain().await.map_err(anyhow::Error::msg)?;
        self.commit(&source.consumer).await?;
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
