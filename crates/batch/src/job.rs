//! One batch run: score a snapshot with the served model version and publish one
//! `Prediction` (lane BATCH) per row to the predictions topic, where the cache-writer
//! picks them up.
//!
//! Reading and scoring run on one blocking thread, a chunk of `batch_size` rows at a
//! time, while the async side encodes and publishes the previous chunks; what waits for
//! delivery reports is bounded ([`must_wait`]), which bounds memory whatever the file's
//! size. The run succeeds only when every prediction is acknowledged.
//!
//! A row costs no allocation of its own on the way out: each prediction is a view over
//! the chunk's columns, written into one reused buffer (librdkafka copies it), and a
//! chunk's delivery reports are counted down as one group.
//!
//! Ids are deterministic (`batch-<entity>-<event time>`), so a re-run of the same
//! snapshot with the same version is a duplicate the cache ignores, and one with a new
//! version replaces the old scores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lanes_common::Settings;
use lanes_common::avro::{AvroCodec, write_framed};
use lanes_common::kafka;
use lanes_common::model::Model;
use lanes_common::producer::{Group, Producer, Reported};
use lanes_common::records::{
    Lane, MAX_ENTITY_ID_BYTES, Prediction, PredictionView, check_client_time, now_millis,
};
use rdkafka::producer::{FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;
use crate::snapshot::{Chunk, Format, Snapshot, write::Sink};

/// Chunks published and not yet acknowledged: always this many may be.
pub const IN_FLIGHT_CHUNKS: usize = 4;
/// Rows published and not yet acknowledged: small chunks may be in flight up to this.
/// Four chunks of 1,024 rows kept the run waiting on acknowledgements (about 10 ms
/// each, the producer's linger and one round trip): 0.31 of raw ONNX Runtime.
pub const IN_FLIGHT_ROWS: u64 = 65_536;

/// Whether the run waits for an acknowledgement before publishing another chunk, with
/// `chunks` chunks of `rows` rows in flight.
pub fn must_wait(chunks: usize, rows: u64) -> bool {
    chunks >= IN_FLIGHT_CHUNKS && rows >= IN_FLIGHT_ROWS
}

/// What to score and where the results go.
#[derive(Debug, Clone)]
pub struct Job {
    pub input: PathBuf,
    /// From the file's extension when `None`.
    pub format: Option<Format>,
    pub batch_size: usize,
    /// One event time for every row, for snapshots without an `event_time` column.
    pub as_of: Option<i64>,
    /// Also write the scored rows here (Parquet or CSV, by extension).
    pub out: Option<PathBuf>,
    /// Publish predictions; off for a dry run that only reads, scores and writes `out`.
    pub publish: bool,
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct Report {
    pub rows: u64,
    pub chunks: u64,
    pub model_name: String,
    pub model_version: String,
    pub elapsed: Duration,
    /// Time inside ONNX Runtime.
    pub scoring: Duration,
}

impl Report {
    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The deterministic id of a snapshot row's prediction.
pub fn event_id(entity: &str, event_time: i64) -> String {
    let mut id = String::new();
    write_event_id(&mut id, entity, event_time);
    id
}

/// Scores one snapshot, publishes its predictions and waits for every acknowledgement.
pub async fn run(
    settings: &Settings,
    job: &Job,
    interactive: bool,
    stop: &CancellationToken,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let producer = if job.publish {
        Some(connected_producer(settings)?)
    } else {
        None
    };
    let cfg = settings.model.clone();
    let (model, refused) = tokio::task::spawn_blocking(move || cfg.load())
        .await?
        .context("loading the model")?;
    for (dir, e) in refused {
        tracing::error!(dir = %dir.display(), error = %e, "model version refused; scoring with an older one");
    }
    let model = Arc::new(model);
    // The whole file is checked before anything is published: a bad row found halfway
    // would leave half a run in the cache. It is read twice; publishing costs more.
    if job.publish {
        let (job, features) = (job.clone(), model.spec.features.clone());
        let skew = settings.ingest.max_clock_skew_ms;
        tokio::task::spawn_blocking(move || check_all(&job, &features, skew)).await??;
    }
    let snapshot = tokio::task::spawn_blocking({
        let (job, features) = (job.clone(), model.spec.features.clone());
        move || Snapshot::open(&job.input, job.format, &features, job.batch_size, job.as_of)
    })
    .await??;
    let out = match &job.out {
        Some(path) => Some(
            Sink::create(path, Format::of(path)?, scored_schema())
                .with_context(|| format!("creating {}", path.display()))?,
        ),
        None => None,
    };
    let mut publisher = if let Some(producer) = producer {
        let topic = settings.topics.predictions.clone();
        kafka::ensure_topics(&settings.kafka, &[&topic])
            .await
            .context("creating the predictions topic")?;
        Some(Publisher {
            producer,
            codec: AvroCodec::new(&settings.registry)?,
            topic,
            schema_id: None,
            event_id: String::new(),
            buf: Vec::with_capacity(256),
        })
    } else {
        None
    };
    tracing::info!(
        input = %job.input.display(),
        rows = ?snapshot.total_rows,
        model = %model.spec.name,
        version = %model.spec.version,
        batch_size = job.batch_size,
        publish = job.publish,
        "batch run started"
    );
    let mut progress = Progress::new(snapshot.total_rows, interactive);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Scored>(2);
    let stem = job
        .input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let scoring = tokio::task::spawn_blocking({
        let model = model.clone();
        move || score_all(snapshot, &model, &stem, out, tx)
    });
    let mut pending = FuturesUnordered::new();
    let (mut rows, mut in_flight) = (0u64, 0u64);
    while let Some(scored) = rx.recv().await {
        if stop.is_cancelled() {
            anyhow::bail!("stopped after {rows} rows were published");
        }
        let n = scored.chunk.rows() as u64;
        match publisher.as_mut() {
            Some(publisher) => {
                let reports = publisher.publish(&scored, &model, stop).await?;
                pending.push(async move { (n, reports.await) });
                in_flight += n;
                while must_wait(pending.len(), in_flight) {
                    let (sent, reports) = pending.next().await.expect("not empty");
                    in_flight -= sent;
                    progress.advance(acknowledged(reports)?);
                }
            }
            None => progress.advance(n),
        }
        rows += n;
    }
    while let Some((_, reports)) = pending.next().await {
        progress.advance(acknowledged(reports)?);
    }
    let (chunks, scoring) = scoring.await??;
    progress.finish();
    let report = Report {
        rows,
        chunks,
        model_name: model.spec.name.clone(),
        model_version: model.spec.version.clone(),
        elapsed: started.elapsed(),
        scoring,
    };
    tracing::info!(
        rows,
        chunks,
        version = %report.model_version,
        seconds = report.elapsed.as_secs_f64(),
        rows_per_second = report.rows_per_second() as u64,
        "batch run finished"
    );
    Ok(report)
}

/// The run's producer, already connecting. An idempotent producer asks for its
/// producer id on a 500 ms timer, and only once a broker connection is up; left to
/// itself it connects on the first tick and has its id on the second, a second after
/// it was created. Connected now, it has the id while the model loads and the snapshot
/// is checked.
fn connected_producer(settings: &Settings) -> anyhow::Result<Producer> {
    let producer = kafka::producer(&settings.for_service("batch").kafka, "lanes-batch")?;
    let client = producer.clone();
    // A thread of its own, not a blocking task: with the broker down, a run that fails
    // on its snapshot must not wait for this request when the runtime shuts down.
    std::thread::Builder::new()
        .name("lanes-batch-connect".into())
        .spawn(move || {
            // Every topic's: asked for by name, the predictions topic could be created
            // by the broker's auto-creation before ensure_topics gives it partitions.
            let metadata = client.inner().client();
            if let Err(e) = metadata.fetch_metadata(None, Duration::from_secs(5)) {
                tracing::debug!(error = %e, "early metadata request failed; producing will retry");
            }
        })
        .context("starting a thread")?;
    Ok(producer)
}

/// Reads every row of the snapshot as the run will, and checks its event times as the
/// cache-writer will (not before 2000, not far ahead, by `max_skew_ms`) and its entity ids
/// against the cache's limit. Returns the rows. A prediction of an id within the limit
/// fits any `message.max.bytes` the settings allow
/// ([`lanes_common::config::MIN_PREDICTION_MESSAGE_BYTES`]).
fn check_all(job: &Job, features: &[String], max_skew_ms: u64) -> anyhow::Result<u64> {
    let snapshot = Snapshot::open(&job.input, job.format, features, job.batch_size, job.as_of)?;
    let now = now_millis();
    let mut rows = 0u64;
    for chunk in snapshot {
        let chunk = chunk?;
        let row = |i: usize| chunk.first_row + i as u64;
        for (i, t) in chunk.event_times.iter().enumerate() {
            check_client_time("event_time", *t, now, max_skew_ms)
                .map_err(|e| anyhow::anyhow!("{}: row {}: {e}", job.input.display(), row(i)))?;
        }
        if let Some((i, e)) =
            (chunk.entity_ids.iter().enumerate()).find(|(_, e)| e.len() > MAX_ENTITY_ID_BYTES)
        {
            anyhow::bail!(
                "{}: row {}: entity_id of {} bytes is over {MAX_ENTITY_ID_BYTES}, the longest the cache takes",
                job.input.display(),
                row(i),
                e.len(),
            );
        }
        rows += chunk.rows() as u64;
    }
    Ok(rows)
}

/// A chunk and its scores, handed from the blocking half to the publisher.
struct Scored {
    chunk: Chunk,
    scores: Vec<f64>,
    batch_id: String,
    scored_at: i64,
}

impl Scored {
    /// Row `i`'s prediction, its event id written into `event_id`.
    fn view<'a>(
        &'a self,
        i: usize,
        model: &'a Model,
        event_id: &'a mut String,
    ) -> PredictionView<'a> {
        let (entity, time, score) = (
            &self.chunk.entity_ids[i],
            self.chunk.event_times[i],
            self.scores[i],
        );
        event_id.clear();
        write_event_id(event_id, entity, time);
        PredictionView {
            event_id,
            entity_id: entity,
            score,
            label: Some(model.label(score)),
            model_name: &model.spec.name,
            model_version: &model.spec.version,
            lane: Lane::Batch,
            event_time: time,
            ingested_at: None,
            scored_at: self.scored_at,
            batch_id: Some(&self.batch_id),
        }
    }
}

fn write_event_id(out: &mut String, entity: &str, event_time: i64) {
    use std::fmt::Write;
    let _ = write!(out, "batch-{entity}-{event_time}");
}

/// Encodes and produces predictions for one run.
struct Publisher {
    producer: Producer,
    codec: AvroCodec,
    topic: String,
    /// The registry's id of `Prediction` under the topic's subject, once known.
    schema_id: Option<u32>,
    event_id: String,
    buf: Vec<u8>,
}

impl Publisher {
    /// Enqueues one prediction per row of `scored`; the returned future resolves when
    /// the broker has answered for all of them.
    async fn publish(
        &mut self,
        scored: &Scored,
        model: &Model,
        stop: &CancellationToken,
    ) -> anyhow::Result<Reported<u64>> {
        let mut group = Group::new();
        for i in 0..scored.chunk.rows() {
            let view = scored.view(i, model, &mut self.event_id);
            let id = match self.schema_id {
                Some(id) => id,
                None => {
                    // The first record registers the schema (or finds it registered).
                    self.codec
                        .encode_retrying(&self.topic, &view.to_prediction(), stop)
                        .await?;
                    let id = self
                        .codec
                        .known_id::<Prediction>(&self.topic)
                        .context("the registry answered without a schema id")?;
                    *self.schema_id.insert(id)
                }
            };
            self.buf.clear();
            write_framed::<Prediction, _>(id, &view, &mut self.buf)
                .context("encoding a prediction")?;
            let record = FutureRecord::to(&self.topic)
                .key(view.entity_id)
                .payload(&self.buf);
            self.producer.enqueue_part(&mut group, record).await?;
        }
        group.close_part(scored.chunk.rows() as u64, true);
        Ok(group.seal())
    }
}

/// Rows of a chunk once all its reports are in, or the first refusal.
fn acknowledged(reports: Vec<(u64, rdkafka::error::KafkaResult<()>)>) -> anyhow::Result<u64> {
    let mut rows = 0;
    for (n, result) in reports {
        result.context("publishing predictions")?;
        rows += n;
    }
    Ok(rows)
}

/// The blocking half: read, score, write `out`, hand scored chunks over. Returns the
/// number of chunks and the time spent in ONNX Runtime.
fn score_all(
    snapshot: Snapshot,
    model: &Model,
    stem: &str,
    mut out: Option<Sink>,
    tx: tokio::sync::mpsc::Sender<Scored>,
) -> anyhow::Result<(u64, Duration)> {
    let (mut chunks, mut scoring) = (0u64, Duration::ZERO);
    for chunk in snapshot {
        let chunk = chunk?;
        let rows = chunk.rows();
        let started = Instant::now();
        let scores = model
            .score(&chunk.features, rows)
            .with_context(|| format!("scoring rows {}..", chunk.first_row))?;
        scoring += started.elapsed();
        let scored = Scored {
            chunk,
            scores,
            batch_id: format!("batch-{stem}-{}-{chunks}", model.spec.version),
            scored_at: now_millis(),
        };
        if let Some(sink) = out.as_mut() {
            sink.write(&scored_batch(&scored, model)?)?;
        }
        chunks += 1;
        if tx.blocking_send(scored).is_err() {
            // The publishing side stopped; its error is the one to report.
            return Ok((chunks, scoring));
        }
    }
    if let Some(sink) = out {
        sink.finish()?;
    }
    Ok((chunks, scoring))
}

/// The columns of `--out`.
pub fn scored_schema() -> Arc<Schema> {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("event_time", ts(), false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("model_name", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("scored_at", ts(), false),
    ]))
}

fn scored_batch(s: &Scored, model: &Model) -> anyhow::Result<RecordBatch> {
    let rows = s.chunk.rows();
    let ts = |t: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(t).with_timezone("UTC"))
    };
    let repeat = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; rows])) };
    let event_ids: Vec<String> = (s.chunk.entity_ids.iter())
        .zip(&s.chunk.event_times)
        .map(|(entity, time)| event_id(entity, *time))
        .collect();
    Ok(RecordBatch::try_new(
        scored_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(&s.chunk.entity_ids)),
            ts(s.chunk.event_times.clone()),
            Arc::new(StringArray::from(event_ids)),
            Arc::new(Float64Array::from(s.scores.clone())),
            Arc::new(StringArray::from_iter_values(
                s.scores.iter().map(|v| model.label(*v)),
            )),
            repeat(&model.spec.name),
            repeat(&model.spec.version),
            ts(vec![s.scored_at; rows]),
        ],
    )?)
}

/// Writes an entity snapshot of `entities` rows from the project's generator.
pub fn generate(
    path: &Path,
    format: Format,
    entities: usize,
    seed: u64,
    as_of: i64,
) -> anyhow::Result<()> {
    use lanes_common::generator::{FEATURES, Generator};
    let names: Vec<String> = FEATURES.iter().map(|f| f.to_string()).collect();
    let schema = crate::snapshot::write::snapshot_schema(format, &names);
    let mut sink = Sink::create(path, format, schema.clone())?;
    let mut rows = Generator::snapshot(seed, entities).peekable();
    const CHUNK: usize = 8192;
    while rows.peek().is_some() {
        let mut ids = Vec::with_capacity(CHUNK);
        let mut columns = vec![Vec::with_capacity(CHUNK); FEATURES.len()];
        for (id, features) in rows.by_ref().take(CHUNK) {
            ids.push(id);
            for (c, v) in columns.iter_mut().zip(features) {
                c.push(v);
            }
        }
        sink.write(&crate::snapshot::write::snapshot_batch(
            &schema, ids, as_of, columns,
        )?)?;
    }
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_fill_the_rows_in_flight_and_large_ones_keep_four_chunks() {
        // 1,024-row chunks: 64 in flight before the run waits.
        assert!(!must_wait(4, 4 * 1024));
        assert!(!must_wait(63, 63 * 1024));
        assert!(must_wait(64, 64 * 1024));
        // 100,000-row chunks: four, as before.
        assert!(!must_wait(3, 300_000));
        assert!(must_wait(4, 400_000));
    }

    #[test]
    fn ids_are_deterministic_per_entity_and_time() {
        assert_eq!(event_id("card-1", 5), event_id("card-1", 5));
        assert_ne!(event_id("card-1", 5), event_id("card-1", 6));
        assert_ne!(event_id("card-1", 5), event_id("card-2", 5));
    }

    #[test]
    fn generated_snapshots_repeat_and_read_back_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = lanes_common::generator::FEATURES
            .iter()
            .map(|f| f.to_string())
            .collect();
        for format in [Format::Csv, Format::Parquet] {
            let a = dir.path().join(format!("a.{format:?}").to_lowercase());
            let b = dir.path().join(format!("b.{format:?}").to_lowercase());
            generate(&a, format, 20_000, 3, 1_000).unwrap();
            generate(&b, format, 20_000, 3, 1_000).unwrap();
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            let snap = Snapshot::open(&a, None, &names, 4096, None).unwrap();
            assert_eq!(snap.total_rows, Some(20_000));
            let chunks: Vec<Chunk> = snap.collect::<Result<_, _>>().unwrap();
            assert_eq!(chunks.len(), 5);
            let ids: std::collections::HashSet<&String> =
                chunks.iter().flat_map(|c| &c.entity_ids).collect();
            assert_eq!(ids.len(), 20_000);
            assert!(
                chunks
                    .iter()
                    .all(|c| c.event_times.iter().all(|t| *t == 1_000))
            );
        }
    }
}
