//! One way to wait out a dependency: exponential backoff with jitter (so replicas that
//! lost Redis together do not come back in lock step), retrying only what
//! [`Failure::is_transient`] says may pass, until shutdown.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::error::Failure;

/// The delays between tries: 50 ms doubling to 5 s, each with random jitter, forever.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .build()
}

/// Something whose failures may or may not pass on a retry.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for Failure {
    fn is_transient(&self) -> bool {
        Failure::is_transient(self)
    }
}

impl Transient for rdkafka::error::KafkaError {
    fn is_transient(&self) -> bool {
        Failure::from_produce(self).is_transient()
    }
}

impl Transient for crate::avro::DecodeError {
    fn is_transient(&self) -> bool {
        crate::avro::DecodeError::is_transient(self)
    }
}

impl Transient for crate::avro::EncodeError {
    fn is_transient(&self) -> bool {
        self.retriable
    }
}

/// Runs `op` until it succeeds, fails for good, or `stop` is cancelled (then the last
/// transient error is returned, so the caller stops without acknowledging its input).
pub async fn retrying<T, E, F, Fut>(what: &str, stop: &CancellationToken, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // Built at the first failure: the hot path (every decode, encode and write) succeeds.
    let mut delays = None;
    loop {
        match op().await {
            Err(e) if e.is_transient() && !stop.is_cancelled() => {
                let delay = delays
                    .get_or_insert_with(backoff)
                    .next()
                    .unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(e),
                }
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_grow_with_jitter_and_stay_bounded() {
        let d: Vec<Duration> = backoff().take(40).collect();
        assert_eq!(d.len(), 40, "the backoff never runs out");
        assert!(d.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(d[12] >= Duration::from_secs(1), "delays grow: {d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_poison_is_not() {
        let stop = CancellationToken::new();
        let tries = AtomicU32::new(0);
        let r: Result<u32, Failure> = retrying("op", &stop, || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(Failure::transient("down")),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        let tries = AtomicU32::new(0);
        let r: Result<(), Failure> = retrying("op", &stop, || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(Failure::poison(crate::dlq::ErrorClass::DecodeError, "bad"))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries() {
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            stopper.cancel();
        });
        let r: Result<(), Failure> =
            retrying("op", &stop, || async { Err(Failure::transient("down")) }).await;
        assert!(r.unwrap_err().is_transient());
    }
}
