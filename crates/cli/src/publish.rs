//! `lanes publish`: raw JSON events onto the raw topic, keyed by entity id.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::generator::Generator;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::producer::Producer;
use rdkafka::producer::FutureRecord;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Publish this many generated events.
    #[arg(long, conflicts_with = "file")]
    sample: Option<usize>,
    /// Publish each line of this JSON-lines file as one event.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Seed of the generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Distinct cards among generated events.
    #[arg(long, default_value_t = 1000)]
    cards: usize,
    /// Topic to publish to [default: topics.raw].
    #[arg(long)]
    topic: Option<String>,
}

pub async fn run(args: PublishArgs, settings: &Settings) -> anyhow::Result<()> {
    let lines: Vec<String> = match (&args.sample, &args.file) {
        (Some(n), None) => Generator::new(args.seed, args.cards)
            .take(*n)
            .map(|s| s.raw_json())
            .collect(),
        (None, Some(path)) => std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .collect::<Result<_, _>>()?,
        _ => anyhow::bail!("give --sample N or --file FILE"),
    };
    let topic = args.topic.unwrap_or_else(|| settings.topics.raw.clone());
    let producer: Producer = lanes_common::kafka::producer(&settings.kafka, "lanes-cli")?;
    let started = Instant::now();
    let sent = publish_lines(&producer, &topic, &lines).await?;
    eprintln!(
        "published {sent} events to {topic} in {:.2?}",
        started.elapsed()
    );
    Ok(())
}

/// Produces every line, keyed by its `entity_id` when it has one, and waits for all acks.
pub async fn publish_lines(
    producer: &Producer,
    topic: &str,
    lines: &[String],
) -> anyhow::Result<usize> {
    let mut pending = Vec::with_capacity(lines.len());
    for line in lines {
        let key = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                v.get("entity_id")
                    .and_then(|e| e.as_str())
                    .map(str::to_string)
            });
        let mut record = FutureRecord::<str, str>::to(topic).payload(line);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        pending.push(enqueue(producer, record).await?);
    }
    let count = pending.len();
    for d in pending {
        delivered(d).await.context("publish not acknowledged")?;
    }
    Ok(count)
}
