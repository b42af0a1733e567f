//! The producer's polling thread against the real broker: it delivers reports as they
//! come, sleeps while there are none, and stops with the last clone. Its own test
//! binary, so the process holds no other producer's thread.

use std::time::{Duration, Instant};

use lanes_tests::*;

const THREAD: &str = "lanes-produce";

#[tokio::test]
async fn the_polling_thread_delivers_sleeps_when_idle_and_stops_with_the_last_clone() {
    let s = settings();
    let topic = unique("producer-thread");
    create_topics(&s, &[&topic]).await;
    let p = producer(&s);
    produce(&p, &topic, b"k", b"first").await;
    let ids = threads(THREAD);
    assert_eq!(ids.len(), 1, "one polling thread per producer: {ids:?}");
    let tid = &ids[0];

    // rdkafka's own polling thread wakes 10 times a second and spins through the last
    // millisecond of each wait: about 30 ms on a CPU and 30 wake-ups here.
    assert_sleeps(tid).await;

    // Reports wake it at once: its idle wait (1 s) would make 20 sends take about 10 s.
    let clone = p.clone();
    let started = Instant::now();
    for i in 0..20u8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        produce(&clone, &topic, b"k", &[i]).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "20 acknowledgements after idle gaps took {:?}",
        started.elapsed()
    );

    drop(p);
    assert_eq!(threads(THREAD).len(), 1, "a clone keeps the thread");
    produce(&clone, &topic, b"k", b"last").await;
    drop(clone);
    assert!(
        threads(THREAD).is_empty(),
        "the thread stops with the last clone"
    );
}
