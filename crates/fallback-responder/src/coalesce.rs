//! Single flight: concurrent requests for the same work share one run of it. The work
//! runs as its own task, so it finishes (and warms the cache) even when every waiter
//! gave up at its deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

pub type Flight<T> = Shared<BoxFuture<'static, T>>;

pub struct SingleFlight<T: Clone> {
    flights: Arc<Mutex<HashMap<String, Flight<T>>>>,
}

impl<T: Clone + Send + Sync + 'static> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Joins the flight for `key`, or starts one with `work()`. The bool says whether
    /// this call started it.
    pub fn join<F, W>(&self, key: &str, work: W) -> (Flight<T>, bool)
    where
        W: FnOnce() -> F,
        F: Future<Output = T> + Send + 'static,
    {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(f) = flights.get(key) {
            return (f.clone(), false);
        }
        let fut = work();
        let (map, k) = (self.flights.clone(), key.to_string());
        let task = tokio::spawn(async move {
            let out = fut.await;
            map.lock().expect("flights lock").remove(&k);
            out
        });
        let flight: Flight<T> = async move { task.await.expect("flight task") }
            .boxed()
            .shared();
        flights.insert(key.to_string(), flight.clone());
        (flight, true)
    }

    pub fn in_flight(&self) -> usize {
        self.flights.lock().expect("flights lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_joins_share_one_run() {
        let sf: SingleFlight<u32> = SingleFlight::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        let mut started = 0;
        for _ in 0..20 {
            let runs = runs.clone();
            let (f, new) = sf.join("card-1", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                7
            });
            started += new as usize;
            waiters.push(f);
        }
        let other = sf.join("card-2", || async { 9 }).0;
        assert_eq!(futures::future::join_all(waiters).await, vec![7; 20]);
        assert_eq!(other.await, 9);
        assert_eq!((runs.load(Ordering::SeqCst), started), (1, 1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sf.in_flight(), 0, "finished flights are forgotten");
        let (again, new) = sf.join("card-1", || async { 8 });
        assert!(new);
        assert_eq!(again.await, 8);
    }

    #[tokio::test]
    async fn the_work_finishes_when_every_waiter_gives_up() {
        let sf: SingleFlight<()> = SingleFlight::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let (f, _) = sf.join("k", move || async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(1), f)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
