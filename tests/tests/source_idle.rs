//! A source's polling thread against the real broker: asleep while nothing comes, and
//! woken at once by records, by a rebalance and by `close`. Its own test binary, so the
//! process holds no other source's thread.

use std::time::{Duration, Instant};

use lanes_common::source::{Source, SourceEvent};
use lanes_tests::*;
use rdkafka::Message;
use rdkafka::producer::FutureRecord;

/// How long a test waits for a record it sent.
const WAIT: Duration = Duration::from_secs(30);

/// The next event of `source` that is not a revocation, answering revocations; `None`
/// after `timeout`.
async fn next_event(source: &mut Source, timeout: Duration) -> Option<SourceEvent> {
    tokio::time::timeout(timeout, async {
        loop {
            match source.recv().await.expect("source runs") {
                SourceEvent::Revoked { done, .. } => {
                    let _ = done.send(());
                }
                e => return e,
            }
        }
    })
    .await
    .ok()
}

async fn send_to(p: &lanes_common::producer::Producer, topic: &str, partition: i32, value: &str) {
    let record = FutureRecord::to(topic)
        .partition(partition)
        .key("k")
        .payload(value);
    produce_record(p, record).await;
}

#[tokio::test]
async fn an_idle_source_sleeps_and_wakes_for_records_rebalances_and_close() {
    let mut s = settings();
    s.kafka.partitions = 2;
    // Heartbeats this often put a rebalance before the member within 100 ms.
    s.kafka
        .consumer_properties
        .insert("heartbeat.interval.ms".into(), "100".into());
    let topic = unique("idle-source");
    create_topics(&s, &[&topic]).await;
    let group = unique("group");
    let start = |service: &str| source(&s, service, &group, &[&topic], Duration::from_secs(10));
    let p = producer(&s);

    let mut a = start("idle-a");
    send_to(&p, &topic, 0, "first").await;
    assert_eq!(payload(&next_message(&mut a, WAIT).await), b"first");
    let ids = threads("idle-a-poll");
    assert_eq!(ids.len(), 1, "one polling thread per source: {ids:?}");
    let tid = &ids[0];

    // Idle: a thread that polled every 50 ms woke 60 times here.
    assert_sleeps(tid).await;

    // Records wake it: its idle wait (1 s) would put about 5 s into these ten.
    let mut waited = Duration::ZERO;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        send_to(&p, &topic, i % 2, &i.to_string()).await;
        let m = next_message(&mut a, WAIT).await;
        waited += started.elapsed();
        assert_eq!(payload(&m), i.to_string().as_bytes());
    }
    eprintln!("ten records after idle gaps: {waited:?}");
    assert!(
        waited < Duration::from_millis(2500),
        "ten records after idle gaps took {waited:?} to arrive"
    );

    // A rebalance wakes it: the thread has just gone to sleep after a record, so a
    // revocation served only on the idle wait comes a second after it.
    send_to(&p, &topic, 0, "before-b").await;
    assert_eq!(payload(&next_message(&mut a, WAIT).await), b"before-b");
    let started = Instant::now();
    let mut b = start("idle-b");
    let revoked = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match a.recv().await.expect("source runs") {
                SourceEvent::Revoked { partitions, done } => {
                    let _ = done.send(());
                    return (partitions, started.elapsed());
                }
                SourceEvent::Assigned(_) => {}
                SourceEvent::Message(m) => panic!("a record before the revocation: {m:?}"),
            }
        }
    })
    .await
    .expect("a revocation within 30 s");
    let (partitions, after) = revoked;
    eprintln!("revoked {after:?} after the second member started");
    assert_eq!(
        partitions.len(),
        1,
        "one of two partitions moves: {partitions:?}"
    );
    assert!(
        after < Duration::from_millis(900),
        "the idle member gave up its partition {after:?} after the other joined"
    );
    let given = partitions[0].1;
    let taken = loop {
        match next_event(&mut b, WAIT).await {
            Some(SourceEvent::Assigned(p)) if !p.is_empty() => break p,
            Some(_) => {}
            None => panic!("the new member got no partition within 30 s"),
        }
    };
    assert_eq!(taken, vec![(topic.clone(), given)], "the given partition");
    // tansu pauses a joining follower for 3 s; an assignment served on the idle wait
    // instead of the consumer queue's ring came a second after that.
    let after = started.elapsed();
    eprintln!("assigned {after:?} after the second member started");
    assert!(
        after < Duration::from_millis(3600),
        "the new member was assigned its partition {after:?} after it started"
    );
    // Nothing was committed: the new member reads its partition from the start.
    send_to(&p, &topic, given, "to-b").await;
    loop {
        let m = next_message(&mut b, WAIT).await;
        assert_eq!(m.partition(), given, "only the given partition");
        if payload(&m) == b"to-b" {
            break;
        }
    }

    // Close wakes it: right after a record the thread sleeps, and stops at once.
    send_to(&p, &topic, 1 - given, "last").await;
    assert_eq!(payload(&next_message(&mut a, WAIT).await), b"last");
    let started = Instant::now();
    let closing = tokio::spawn(a.close());
    while !threads("idle-a-poll").is_empty() {
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the polling thread still ran {:?} after close",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("polling thread gone {:?} after close", started.elapsed());
    closing.await.unwrap();
    b.close().await;
}
