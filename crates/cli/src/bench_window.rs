//! `lanes bench-window`: the micro-batcher's window code (fixed and adaptive) fed
//! simulated traffic across a rate sweep: Poisson arrivals, each event already some
//! milliseconds old (ingest and a broker hop, jittered). It prints each policy's p99
//! event-to-batch latency and mean batch size per rate beside the target. No broker:
//! the window logic alone, in simulated time, so runs are exact and repeatable.

use std::time::Duration;

use clap::Args;
use lanes_common::records::Event;
use lanes_micro_batcher::window::{WindowConfig, Windows};
use serde_json::json;
use tokio::time::Instant;

#[derive(Debug, Args)]
pub struct BenchWindowArgs {
    /// Event-to-batch latency target of the adaptive window, ms.
    #[arg(long, default_value_t = 50)]
    target_ms: u64,
    /// Fixed windows to compare, ms (also the adaptive window's max_delay_ms: the largest).
    #[arg(long, value_delimiter = ',', default_value = "20,100")]
    fixed_ms: Vec<u64>,
    /// Arrival rates, events per second.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20,100,500,2000,10000,50000"
    )]
    rates: Vec<u64>,
    /// Mean upstream age of an event on arrival, ms (exponential jitter of a third on top).
    #[arg(long, default_value_t = 6.0)]
    upstream_ms: f64,
    /// Simulated seconds per rate.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 256)]
    max_events: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-window.json")]
    out: std::path::PathBuf,
}

/// xorshift64*: deterministic arrivals without a dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }
}

/// p99 event-to-batch latency (ms) and mean batch size of `cfg` at `rate`.
fn simulate(cfg: WindowConfig, rate: u64, args: &BenchWindowArgs) -> (f64, f64) {
    let mut w = Windows::new(cfg, "events");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ rate);
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1000.0;
    let mut latencies = Vec::new();
    let mut batches = 0usize;
    let mut record = |closed: Vec<lanes_micro_batcher::window::Closed>| {
        for c in closed {
            batches += 1;
            latencies.extend(
                c.batch
                    .ingested_ats
                    .iter()
                    .map(|i| (c.batch.closed_at - i) as f64),
            );
        }
    };
    let horizon = args.seconds as f64;
    let mut t = 0.0;
    let mut offset = 0i64;
    while t < horizon {
        t += rng.exponential(1.0 / rate as f64);
        let now = start + Duration::from_secs_f64(t);
        while let Some(d) = w.next_deadline().filter(|d| *d <= now) {
            record(w.expire(d, ms(d).round() as i64));
        }
        let age = args.upstream_ms + rng.exponential(args.upstream_ms / 3.0);
        let now_ms = ms(now).round() as i64;
        let event = Event {
            event_id: offset.to_string(),
            entity_id: "e".into(),
            kind: "purchase".into(),
            event_time: 0,
            ingested_at: now_ms - age.round() as i64,
            features: Default::default(),
        };
        record(w.push(0, offset, event, now, now_ms));
        offset += 1;
    }
    let end = start + Duration::from_secs_f64(t);
    record(w.flush(None, end, ms(end).round() as i64));
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    (p99, latencies.len() as f64 / batches.max(1) as f64)
}

pub fn run(args: BenchWindowArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.target_ms > 0, "--target-ms must be > 0");
    anyhow::ensure!(
        !args.fixed_ms.is_empty(),
        "--fixed-ms needs at least one window"
    );
    let max_delay = *args.fixed_ms.iter().max().expect("not empty");
    let cfg = |delay_ms: u64, target: Option<u64>| WindowConfig {
        max_events: args.max_events,
        max_bytes: usize::MAX / 2,
        max_delay: Duration::from_millis(delay_ms),
        priority_kinds: Vec::new(),
        features: Vec::new(),
        target_latency: target.map(Duration::from_millis),
    };
    let mut policies: Vec<(String, WindowConfig)> = args
        .fixed_ms
        .iter()
        .map(|d| (format!("fixed {d} ms"), cfg(*d, None)))
        .collect();
    policies.push((
        format!("adaptive, target {} ms", args.target_ms),
        cfg(max_delay, Some(args.target_ms)),
    ));
    println!(
        "p99 event-to-batch latency (ms) / mean batch size; goal: adaptive p99 <= {} ms at every rate",
        args.target_ms
    );
    print!("{:>10}", "events/s");
    for (name, _) in &policies {
        print!(" | {name:>24}");
    }
    println!();
    let mut rows = Vec::new();
    let mut adaptive_ok = true;
    for &rate in &args.rates {
        anyhow::ensure!(rate > 0, "rates must be > 0");
        print!("{rate:>10}");
        let mut row = serde_json::Map::new();
        for (i, (name, c)) in policies.iter().enumerate() {
            let (p99, size) = simulate(c.clone(), rate, &args);
            print!(" | {:>13.1} / {size:>8.1}", p99);
            if i == policies.len() - 1 && p99 > args.target_ms as f64 {
                adaptive_ok = false;
            }
            row.insert(name.clone(), json!({"p99_ms": p99, "mean_batch": size}));
        }
        println!();
        rows.push(json!({"rate": rate, "policies": row}));
    }
    println!(
        "adaptive p99 within target at every rate: {}",
        if adaptive_ok { "yes" } else { "NO" }
    );
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&json!({
            "target_ms": args.target_ms,
            "upstream_ms": args.upstream_ms,
            "rows": rows,
            "adaptive_within_target": adaptive_ok,
        }))?,
    )?;
    Ok(())
}
