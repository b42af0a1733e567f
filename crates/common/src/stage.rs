//! The one service loop. Every streaming service is a [`Stage`] run by [`run`]:
//!
//! 1. a [`Source`] thread polls the consumer and hands messages on in order, pausing its
//!    partitions (and still polling) while the stage has no room;
//! 2. the runner takes what is waiting, up to `max_batch`, while the inputs in flight
//!    stay under `max_in_flight` records and `max_in_flight_bytes`;
//! 3. it decodes each input ([`Decode`]): poison goes to the dead-letter topic, an
//!    unreachable registry is retried with backoff;
//! 4. the stage handles the decoded batch and says, through [`Out`], when each input
//!    is done: after its output's delivery report, a Redis reply, or at once;
//! 5. every 200 ms, and before a revoked partition is let go or the service stops, the
//!    runner commits each partition up to its lowest input not yet done.
//!
//! A stage with windows (the micro-batcher) also names its next deadline ([`Stage::tick`])
//! and flushes open work for partitions being released ([`Stage::flush`]). An output
//! the broker refuses for good (too large, a topic that cannot be written) dead-letters
//! its inputs; only what a restart might cure stops the service, uncommitted.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use prometheus::IntCounterVec;
use rdkafka::Message;
use rdkafka::message::{OwnedMessage, ToBytes};
use rdkafka::producer::FutureRecord;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::avro::{AvroCodec, DecodeError};
use crate::dlq::{DlqWriter, ErrorClass};
use crate::error::Failure;
use crate::producer::{Group, Producer};
use crate::records::Record;
use crate::retry;
use crate::service::ServiceContext;
use crate::source::{Acks, RecordHeaders, Source, SourceEvent};

/// One input and what it decoded to.
pub struct Input<R> {
    pub message: OwnedMessage,
    pub record: R,
}

/// How a stage's inputs are read from their bytes.
pub trait Decode: Sized + Send + 'static {
    fn decode(
        codec: &AvroCodec,
        bytes: &[u8],
    ) -> impl Future<Output = Result<Self, DecodeError>> + Send;
}

impl<R: Record> Decode for R {
    async fn decode(codec: &AvroCodec, bytes: &[u8]) -> Result<Self, DecodeError> {
        codec.decode::<R>(bytes).await.map(|d| d.record)
    }
}

/// Inputs taken as they are (ingest reads JSON itself).
pub struct Raw;

impl Decode for Raw {
    async fn decode(_: &AvroCodec, _: &[u8]) -> Result<Self, DecodeError> {
        Ok(Raw)
    }
}

/// What a service does with its inputs; the runner does the rest.
pub trait Stage: Send {
    type Input: Decode;

    /// Handles inputs read together, in order. Each input must end up done, dead-lettered
    /// or waiting for its output through `out`. An error stops the service uncommitted.
    fn handle(
        &mut self,
        inputs: Vec<Input<Self::Input>>,
        out: &mut Out<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// When [`Stage::tick`] is next due, if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn tick(&mut self, _out: &mut Out<'_>) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Emits open work for `partitions` (all when `None`) before they are released.
    fn flush(
        &mut self,
        _partitions: Option<&[(String, i32)]>,
        _out: &mut Out<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// An input was dead-lettered before reaching [`Stage::handle`] (for metrics).
    fn rejected(&mut self, _class: ErrorClass) {}

    /// Background work the stage runs beside its inputs; counts against
    /// `max_in_flight` like them.
    fn busy(&self) -> usize {
        0
    }
}

/// Where a stage reads from and how much it may hold.
#[derive(Debug, Clone)]
pub struct Plan {
    pub service: &'static str,
    pub group: String,
    pub topics: Vec<String>,
    /// Inputs handed to [`Stage::handle`] at most at once.
    pub max_batch: usize,
    /// Inputs read and not yet done, at most; then the source pauses.
    pub max_in_flight: usize,
    /// Their key, value and kept header bytes, at most.
    pub max_in_flight_bytes: usize,
    /// Whether inputs keep their Kafka headers; [`RecordHeaders::Skip`] unless the stage reads
    /// them.
    pub headers: RecordHeaders,
}

impl Plan {
    /// Limits from `[runner]`, reading `topics` in `group`.
    pub fn new(ctx: &ServiceContext, service: &'static str, group: &str, topics: &[&str]) -> Self {
        let r = &ctx.settings.runner;
        Self {
            service,
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            max_batch: r.max_batch.max(1),
            max_in_flight: r.max_in_flight.max(1),
            max_in_flight_bytes: r.max_in_flight_bytes.max(1),
            headers: RecordHeaders::Skip,
        }
    }
}

impl Plan {
    /// Whether another input may be taken: the inputs in flight and the stage's own
    /// background work stay under the limits.
    fn has_room<S: Stage>(&self, acks: &Acks, stage: &S) -> bool {
        acks.in_flight() + stage.busy() < self.max_in_flight
            && acks.in_flight_bytes() < self.max_in_flight_bytes
    }
}

/// The clients a stage writes with.
#[derive(Clone)]
pub struct Io {
    pub codec: AvroCodec,
    pub producer: Producer,
    pub dlq: DlqWriter,
}

/// The clients of `service`: its producer (shared in the process, see
/// [`crate::producer::Producers`]), the registry codec, and a dead-letter writer
/// counting into `dead_letters` and cutting letters to the producer's size limit.
pub fn io(ctx: &ServiceContext, service: &str, dead_letters: IntCounterVec) -> anyhow::Result<Io> {
    let settings = &ctx.settings;
    let producer = ctx.producers.get(&settings.kafka)?;
    Ok(Io {
        codec: AvroCodec::new(&settings.registry)?,
        dlq: DlqWriter::new(producer.clone(), &settings.topics.dlq, service)
            .with_counter(dead_letters)
            .with_max_bytes(settings.producer_message_max_bytes()),
        producer,
    })
}

/// The service was told to stop while it waited for a dependency. Not a failure: the
/// inputs it held are not done, so they stay uncommitted and are read again.
#[derive(Debug, thiserror::Error)]
#[error("stopped while waiting for a dependency ({0}); its inputs will be replayed")]
pub struct Interrupted(pub String);

/// Whether `e` is a stop that left work for a replay, rather than a failure.
fn interrupted(e: &anyhow::Error, stop: &CancellationToken) -> bool {
    stop.is_cancelled() && e.downcast_ref::<Interrupted>().is_some()
}

/// A stage's view of the runner while it handles inputs. Outputs produced through it
/// are waited for together: when it is dropped, their inputs wait for the last
/// delivery report of the lot, and are woken once.
pub struct Out<'a> {
    acks: &'a mut Acks,
    io: &'a Io,
    stop: &'a CancellationToken,
    outputs: Group<Vec<OwnedMessage>>,
}

impl<'a> Out<'a> {
    fn new(acks: &'a mut Acks, io: &'a Io, stop: &'a CancellationToken) -> Self {
        Self {
            acks,
            io,
            stop,
            outputs: Group::new(),
        }
    }

    /// Cancelled when the service is stopping.
    pub fn stop(&self) -> &CancellationToken {
        self.stop
    }

    /// Encodes for `topic`, waiting out an unreachable registry. A schema the registry
    /// refuses is fatal: an operator must act.
    pub async fn encode<R: Record>(&mut self, topic: &str, record: &R) -> anyhow::Result<Vec<u8>> {
        let (io, stop) = (self.io, self.stop);
        match retry::retrying("schema registry", stop, || io.codec.encode(topic, record)).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.retriable => Err(Interrupted(e.message).into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands `record` to the producer (waiting while its queue is full) as an output of
    /// the inputs named by the next [`Out::done_when_delivered`].
    pub async fn produce<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
        &mut self,
        record: FutureRecord<'_, K, P>,
    ) -> Result<(), Failure> {
        self.io
            .producer
            .enqueue_part(&mut self.outputs, record)
            .await
            .map_err(|e| Failure::from_produce(&e))
    }

    /// `inputs` are done when every output produced since the last call is delivered;
    /// a delivery refused for good dead-letters them.
    pub fn done_when_delivered(&mut self, inputs: Vec<OwnedMessage>) {
        self.outputs.close_part(inputs, true);
    }

    /// Outputs produced since the last [`Out::done_when_delivered`] decide nothing: their
    /// inputs are being dead-lettered instead.
    pub fn abandon_outputs(&mut self) {
        if self.outputs.open_outputs() > 0 {
            self.outputs.abandon_part();
        }
    }

    /// `inputs` are done when `work` resolves `Ok` (see [`Acks::wait_for`]).
    pub fn done_when<F>(&mut self, inputs: Vec<OwnedMessage>, work: F)
    where
        F: Future<Output = Result<(), Failure>> + Send + 'static,
    {
        self.acks.wait_for(inputs, work);
    }

    pub fn done(&mut self, input: &OwnedMessage) {
        self.acks.done(input);
    }

    pub fn dead_letter(&mut self, input: OwnedMessage, class: ErrorClass, message: String) {
        self.acks.dead_letter(input, class, message);
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        let outputs = std::mem::take(&mut self.outputs);
        if outputs.is_empty() {
            drop(outputs.seal());
        } else {
            self.acks.wait_for_reports(outputs.seal());
        }
    }
}

/// Runs `stage` over `plan.topics` until `ctx.shutdown` is cancelled, then flushes,
/// drains and commits.
pub async fn run<S: Stage>(
    ctx: &ServiceContext,
    plan: Plan,
    mut stage: S,
    io: Io,
) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let topics: Vec<&str> = plan.topics.iter().map(String::as_str).collect();
    let mut source = Source::start(
        &s.kafka,
        plan.service,
        &plan.group,
        &topics,
        s.shutdown.drain_timeout(),
        &s.runner,
        plan.headers,
        Some(ctx.consumer.clone()),
    )?;
    let mut acks = Acks::new(io.dlq.clone());
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    let stop = &ctx.shutdown;
    ctx.ready.set(true);
    tracing::info!(service = plan.service, topics = ?plan.topics, group = %plan.group, "consuming");
    let consumed: anyhow::Result<()> = async {
        loop {
            let room = plan.has_room(&acks, &stage);
            let deadline = stage.deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(result) = acks.next() => result.context("output not acknowledged")?,
                _ = sleep_until(deadline) => stage.tick(&mut Out::new(&mut acks, &io, stop)).await?,
                event = source.recv(), if room => {
                    let Some(first) = event else { break };
                    let mut batch = Vec::new();
                    let mut batch_bytes = 0;
                    let mut next = Some(first);
                    while let Some(event) = next.take() {
                        match event {
                            SourceEvent::Message(m) => {
                                batch_bytes += acks.track(&m);
                                batch.push(m);
                            }
                            SourceEvent::Assigned(_) => {}
                            SourceEvent::Revoked { partitions, done } => {
                                batch_bytes = 0;
                                handle(&mut stage, std::mem::take(&mut batch), &mut acks, &io, stop).await?;
                                stage.flush(Some(&partitions), &mut Out::new(&mut acks, &io, stop)).await?;
                                acks.release(source.consumer(), &partitions, done).await?;
                            }
                        }
                        if batch.len() < plan.max_batch
                            && batch_bytes < MAX_BATCH_BYTES
                            && plan.has_room(&acks, &stage)
                        {
                            next = source.try_recv();
                        }
                    }
                    handle(&mut stage, batch, &mut acks, &io, stop).await?;
                }
                _ = commit_tick.tick() => acks.commit(source.consumer()).await,
            }
        }
        Ok(())
    }
    .await;
    ctx.ready.set(false);
    match consumed {
        Err(e) if interrupted(&e, stop) => tracing::info!(service = plan.service, "{e}"),
        Err(e) => return Err(e),
        Ok(()) => {
            if let Err(e) = stage.flush(None, &mut Out::new(&mut acks, &io, stop)).await {
                if !interrupted(&e, stop) {
                    return Err(e);
                }
                tracing::info!(service = plan.service, "{e}");
            }
        }
    }
    acks.finish(source).await?;
    tracing::info!(service = plan.service, group = %plan.group, "stopped consuming");
    Ok(())
}

/// Bytes of the inputs decoded together and handed to a stage at once (the first is
/// always taken): a decoded record can take many times its bytes (an empty string is a
/// byte on the wire and 24 in a `Vec<String>`), so records over half a megabyte are
/// decoded and handled one at a time, not a prefetch's worth at once (a scorer given
/// eight such micro-batches peaked at 269 MiB, one at a time at 122). Events of a few
/// hundred bytes still come `max_batch` at a time.
const MAX_BATCH_BYTES: usize = 512 << 10;

/// Decodes `batch` and hands what decoded to the stage.
async fn handle<S: Stage>(
    stage: &mut S,
    batch: Vec<OwnedMessage>,
    acks: &mut Acks,
    io: &Io,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut inputs = Vec::with_capacity(batch.len());
    for message in batch {
        let bytes = message.payload().unwrap_or_default();
        match retry::retrying("schema registry", stop, || {
            S::Input::decode(&io.codec, bytes)
        })
        .await
        {
            Ok(record) => inputs.push(Input { message, record }),
            Err(DecodeError::Poison {
                class,
                message: reason,
            }) => {
                stage.rejected(class);
                acks.dead_letter(message, class, reason);
            }
            Err(DecodeError::Transient(e)) => return Err(Interrupted(e).into()),
        }
    }
    if inputs.is_empty() {
        return Ok(());
    }
    crate::failpoint::hit!(crate::failpoint::AFTER_CONSUME_BEFORE_PRODUCE);
    stage.handle(inputs, &mut Out::new(acks, io, stop)).await
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
