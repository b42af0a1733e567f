//! Background work over the whole cache: a staleness sampler reporting the share of
//! stale entries, and a rate-limited sweep re-scoring entries older than
//! `refresh_after_ms` (or scored by another model version, or with newer online
//! features) from their online features. It also ages the hit ratio's window.

use std::sync::Arc;
use std::time::Duration;

use lanes_common::records::{check_ids, now_millis};
use tokio_util::sync::CancellationToken;

use crate::Core;
use crate::decide::Cached;
use lanes_common::cache;

/// Starts the sampler and the sweep; the handle ends when `stop` is cancelled.
pub fn spawn(core: Arc<Core>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let sample_every = Duration::from_millis(core.cfg.sample_interval_ms.max(100));
        let sweep_every = Duration::from_millis(core.cfg.sweep_interval_ms);
        let mut sample_tick = tokio::time::interval(sample_every);
        let mut sweep_tick = tokio::time::interval(sweep_every.max(Duration::from_millis(100)));
        let mut cursor = 0u64;
        let mut age_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = age_tick.tick() => core.metrics.age_hit_ratio(),
                _ = sample_tick.tick() => {
                    // Read-only, so a stop may cut it short: over a large cache a
                    // sample takes many SCAN pages and must not hold up shutdown.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        sampled = sample(&core) => if let Err(e) = sampled {
                            tracing::warn!(error = %e, "staleness sample failed");
                        },
                    }
                }
                _ = sweep_tick.tick(), if !sweep_every.is_zero() => {
                    match sweep(&core, cursor, &stop).await {
                        Ok(next) => cursor = next,
                        Err(e) => tracing::warn!(error = %e, "refresh sweep failed"),
                    }
                }
            }
        }
    })
}

/// How long one background Redis call may take: longer than a request's read, since a
/// SCAN page or a pipeline of reads is bigger, but bounded.
fn timeout_ms(core: &Core) -> u64 {
    core.cfg.redis_timeout_ms.saturating_mul(10).max(1)
}

/// Keys asked of each SCAN step: every listed key's entry is then read in one pipeline,
/// so a page of entities with long ids (a key may be as long as a Kafka record) stays
/// near a hundred of them.
const SCAN_PAGE: usize = 100;

/// One SCAN step: keys of the cache and the next cursor.
async fn scan(core: &Core, cursor: u64, count: usize) -> Result<(u64, Vec<String>), String> {
    let prefix = core.prefix.clone();
    core.call(timeout_ms(core), move |mut conn| async move {
        cache::scan(&mut conn, &prefix, cursor, count).await
    })
    .await
}

/// Each key's entry, in the keys' order ([`cache::entries`]).
async fn entries(core: &Core, keys: &[String]) -> Result<Vec<Option<Cached>>, String> {
    let keys = keys.to_vec();
    core.call(timeout_ms(core), move |mut conn| async move {
        cache::entries(&mut conn, &keys).await
    })
    .await
}

/// Whether `c`'s prediction is stale for `bound_ms` ([`Cached::staleness`]); `None`
/// when it holds none.
fn is_stale(core: &Core, c: &Cached, bound_ms: i64, now: i64) -> Option<bool> {
    c.scored_at?;
    Some(
        c.staleness(bound_ms, core.model_version().as_deref(), now)
            .is_some(),
    )
}

/// Samples up to `sample_keys` entries and sets the stale-share and serving-version
/// gauges.
pub async fn sample(core: &Core) -> Result<f64, String> {
    let (mut cursor, mut seen, mut stale, mut serving) = (0u64, 0usize, 0usize, 0usize);
    let now = now_millis();
    let version = core.model_version();
    loop {
        let (next, keys) = scan(core, cursor, SCAN_PAGE).await?;
        for c in entries(core, &keys).await?.into_iter().flatten() {
            if seen >= core.cfg.sample_keys {
                break;
            }
            if let Some(s) = is_stale(core, &c, core.cfg.freshness_ms, now) {
                seen += 1;
                stale += s as usize;
                serving += usize::from(version.is_some() && c.model_version == version);
            }
        }
        cursor = next;
        if cursor == 0 || seen >= core.cfg.sample_keys {
            break;
        }
    }
    let of_seen = |n: usize| {
        if seen == 0 {
            0.0
        } else {
            n as f64 / seen as f64
        }
    };
    let share = of_seen(stale);
    core.metrics.stale_share.set(share);
    core.metrics.serving_share.set(of_seen(serving));
    core.metrics.sampled.set(seen as i64);
    Ok(share)
}

/// One pass of the sweep from `cursor`, re-scoring at most `sweep_max_per_second` per
/// second; returns where the next pass starts. Its Redis calls go through the circuit
/// breaker with a timeout, its scorings count against the in-flight limit, and it ends
/// at shutdown.
pub async fn sweep(
    core: &Arc<Core>,
    mut cursor: u64,
    stop: &CancellationToken,
) -> Result<u64, String> {
    let per_second = core.cfg.sweep_max_per_second.max(1);
    let pause = Duration::from_secs_f64(1.0 / per_second as f64);
    let budget = (per_second * core.cfg.sweep_interval_ms / 1000).max(1);
    let mut done = 0u64;
    loop {
        let (next, keys) = scan(core, cursor, SCAN_PAGE).await?;
        let now = now_millis();
        for (key, c) in keys.iter().zip(entries(core, &keys).await?) {
            if done >= budget || stop.is_cancelled() {
                return Ok(cursor);
            }
            let Some(slot) = core.try_slot() else {
                return Ok(cursor);
            };
            let Some(c) = c else { continue };
            let (Some(true), Some(features)) = (
                is_stale(core, &c, core.cfg.refresh_after_ms, now),
                &c.features,
            ) else {
                continue;
            };
            // An id the cache-writer refuses (a key written before the limit, by
            // another writer, or the bare prefix) would be re-scored and dead-lettered on
            // every pass.
            let Some(entity) = key
                .strip_prefix(core.prefix.as_str())
                .filter(|e| check_ids(e, "").is_ok())
            else {
                continue;
            };
            let event_time = c.features_event_time.unwrap_or(now);
            let flight = core.score(
                core,
                entity,
                features,
                false,
                Some(crate::Warm {
                    event_time,
                    event_id: crate::answer::refresh_event_id(entity, event_time),
                    guard: false,
                }),
                slot,
            );
            tokio::select! {
                scored = flight => if let Err(e) = scored {
                    tracing::debug!(entity, error = %e, "refresh failed");
                },
                _ = stop.cancelled() => return Ok(cursor),
            }
            core.metrics.refreshes.with_label_values(&["sweep"]).inc();
            done += 1;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return Ok(cursor),
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(0);
        }
    }
}
