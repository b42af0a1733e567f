//! `lanes bench-batch`: the batch job's rows/s against raw ONNX Runtime at the same
//! batch size, in one run. Raw ORT scores tensors already in memory; the dry run adds
//! reading the Parquet snapshot; the full run adds encoding, publishing and waiting for
//! every acknowledgement (to fresh topics, so nothing else is disturbed).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use lanes_batch::Job;
use lanes_batch::snapshot::{Chunk, Format, Snapshot};
use lanes_common::Settings;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct BenchBatchArgs {
    /// Rows in the generated snapshot. A run's fixed costs (loading the model, the
    /// producer's first connection) are about half a second: far fewer rows measure
    /// those rather than the rate.
    #[arg(long, default_value_t = 1_000_000)]
    entities: usize,
    /// Batch sizes to compare.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    sizes: Vec<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-batch.json")]
    out: PathBuf,
}

pub async fn run(args: BenchBatchArgs, settings: &Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshot = dir.path().join("snapshot.parquet");
    lanes_batch::job::generate(
        &snapshot,
        Format::Parquet,
        args.entities,
        42,
        lanes_common::records::now_millis(),
    )?;
    let (model, _) = settings.model.load()?;
    let stop = CancellationToken::new();
    let mut results = Vec::new();
    println!(
        "| batch size | raw ORT rows/s | dry run rows/s | job rows/s | job / raw (goal >= 0.5) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for &size in &args.sizes {
        let chunks: Vec<Chunk> = Snapshot::open(&snapshot, None, &model.spec.features, size, None)?
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        for c in &chunks {
            std::hint::black_box(model.score(&c.features, c.rows())?);
        }
        let raw = args.entities as f64 / started.elapsed().as_secs_f64();
        let job = |publish| Job {
            input: snapshot.clone(),
            format: None,
            batch_size: size,
            as_of: None,
            out: None,
            publish,
        };
        let dry = lanes_batch::job::run(settings, &job(false), false, &stop).await?;
        let fresh = crate::bench::unique(settings, &format!("batch{size}"));
        let full = lanes_batch::job::run(&fresh, &job(true), false, &stop).await?;
        println!(
            "| {size} | {raw:.0} | {:.0} | {:.0} | {:.2} |",
            dry.rows_per_second(),
            full.rows_per_second(),
            full.rows_per_second() / raw
        );
        results.push(json!({
            "batch_size": size,
            "rows": args.entities,
            "raw_ort_rows_per_second": raw,
            "dry_run_rows_per_second": dry.rows_per_second(),
            "job_rows_per_second": full.rows_per_second(),
            "job_over_raw": full.rows_per_second() / raw,
        }));
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!("results written to {}", args.out.display());
    Ok(())
}
