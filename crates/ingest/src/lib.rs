//! `lanes-ingest`: events become validated Avro `Event`s on `lanes.events`, keyed by
//! entity id. Two consumer loops, each in its own group: raw JSON from
//! `lanes.events.raw`, and `Event`s that publishers already write in Avro (Confluent
//! framing) from `lanes.events.avro`.
//!
//! Each record is validated against the model's feature list ([`validate`]), by the
//! same rules whatever its format; a record that fails goes to the dead-letter topic
//! with its class. An input offset is committed only after its `Event` (or its dead
//! letter) is acknowledged by the broker.

mod metrics;
pub mod validate;

use anyhow::Context;
use lanes_common::Settings;
use lanes_common::dlq::ErrorClass;
use lanes_common::error::Failure;
use lanes_common::kafka;
use lanes_common::model::ModelSpec;
use lanes_common::records::{Event, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::stage::{self, Input, Out, Plan, Raw, Stage};
use prometheus::IntCounter;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;

use crate::metrics::Metrics;
use crate::validate::{Origin, Rejection, Rules};

pub const SERVICE: &str = "ingest";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.ingest,
        needs_redis: false,
        inputs: |s| {
            let mut inputs = vec![(s.ingest.group.clone(), s.topics.raw.clone())];
            if s.ingest.avro {
                inputs.push((avro_group(s), s.topics.avro_events.clone()));
            }
            inputs
        },
        group: |s| &mut s.ingest.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

/// The consumer group of the Avro loop.
fn avro_group(s: &Settings) -> String {
    format!("{}-avro", s.ingest.group)
}

/// The wire format of an input topic, as the `format` label has it.
#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    Avro,
}

impl Format {
    fn label(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
        }
    }
}

/// One loop (JSON or Avro): the rules and output topic both share, and its own counters.
struct Ingest {
    rules: Rules,
    events_topic: String,
    /// This loop's `events` counters, looked up once: a lookup hashes both labels, and
    /// every event is counted.
    valid: IntCounter,
    dead_letter: IntCounter,
}

/// Runs until `ctx.shutdown` is cancelled, then drains and commits.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let spec = ModelSpec::read(&s.model.resolve()?)?;
    let metrics = Metrics::new(&ctx.metrics)?;
    // The Avro topic only while its loop is on: a lane that turned it off owns none.
    let inputs = (def().inputs)(s);
    let mut topics: Vec<&str> = inputs.iter().map(|(_, t)| t.as_str()).collect();
    topics.extend([s.topics.events.as_str(), s.topics.dlq.as_str()]);
    kafka::ensure_topics(&s.kafka, &topics)
        .await
        .context("creating topics")?;
    let rules = Rules::new(spec.features, &s.ingest);
    let ingest = |format: Format| Ingest {
        rules: rules.clone(),
        events_topic: s.topics.events.clone(),
        valid: metrics.events.with_label_values(&[format.label(), "valid"]),
        dead_letter: metrics
            .events
            .with_label_values(&[format.label(), "dead_letter"]),
    };
    // One codec (and schema cache) and one dead-letter writer for both loops.
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let avro_io = io.clone();
    let json = async {
        let plan = Plan::new(&ctx, SERVICE, &s.ingest.group, &[&s.topics.raw]);
        tracing::info!(from = %s.topics.raw, to = %s.topics.events, "ingest running (JSON)");
        stage::run(&ctx, plan, Json(ingest(Format::Json)), io).await
    };
    let avro = async {
        let group = avro_group(s);
        let plan = Plan::new(&ctx, SERVICE, &group, &[&s.topics.avro_events]);
        tracing::info!(from = %s.topics.avro_events, to = %s.topics.events, "ingest running (Avro)");
        stage::run(&ctx, plan, Avro(ingest(Format::Avro)), avro_io).await
    };
    if s.ingest.avro {
        tokio::try_join!(json, avro)?;
    } else {
        json.await?;
    }
    Ok(())
}

impl Ingest {
    /// Writes a validated event to `events`, or dead-letters its input.
    async fn forward(
        &mut self,
        m: OwnedMessage,
        checked: Result<Event, Rejection>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        let event = match checked {
            Ok(event) => event,
            Err((class, message)) => {
                self.dead_letter.inc();
                out.dead_letter(m, class, message);
                return Ok(());
            }
        };
        let bytes = out.encode(&self.events_topic, &event).await?;
        let record = FutureRecord::to(&self.events_topic)
            .key(event.entity_id.as_str())
            .payload(&bytes);
        match out.produce(record).await {
            Ok(()) => {
                self.valid.inc();
                out.done_when_delivered(vec![m]);
            }
            Err(Failure::Poison { class, message }) => {
                self.dead_letter.inc();
                out.dead_letter(m, class, message);
            }
            Err(e) => return Err(e).context("producing an event"),
        }
        Ok(())
    }
}

fn origin(m: &OwnedMessage) -> Origin<'_> {
    Origin {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
    }
}

/// Raw JSON, parsed and validated here.
struct Json(Ingest);

impl Stage for Json {
    type Input = Raw;

    async fn handle(&mut self, inputs: Vec<Input<Raw>>, out: &mut Out<'_>) -> anyhow::Result<()> {
        for Input { message: m, .. } in inputs {
            let payload = m.payload().unwrap_or_default();
            let checked = validate::validate(payload, &self.0.rules, &origin(&m), now_millis());
            self.0.forward(m, checked, out).await?;
        }
        Ok(())
    }
}

/// Avro `Event`s, decoded by the runner with the writer's schema resolved to ours.
struct Avro(Ingest);

impl Stage for Avro {
    type Input = Event;

    async fn handle(&mut self, inputs: Vec<Input<Event>>, out: &mut Out<'_>) -> anyhow::Result<()> {
        for Input { message: m, record } in inputs {
            let len = m.payload().map_or(0, <[u8]>::len);
            let checked =
                validate::validate_event(record, len, &self.0.rules, &origin(&m), now_millis());
            self.0.forward(m, checked, out).await?;
        }
        Ok(())
    }

    fn rejected(&mut self, _class: ErrorClass) {
        self.0.dead_letter.inc();
    }
}
