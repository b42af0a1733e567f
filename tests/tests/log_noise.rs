//! What a running source logs on its own, against the real broker. A binary of its
//! own: it captures every log event of the process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing_subscriber::layer::SubscriberExt;

/// Keeps the message of every log event that is one of rdkafka's statistics dumps.
struct StatsDumps(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StatsDumps {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0.starts_with("Client stats") {
            self.0.lock().unwrap().push(m.0);
        }
    }
}

#[tokio::test]
async fn a_source_does_not_log_librdkafka_statistics() {
    let dumps = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(StatsDumps(dumps.clone())),
    )
    .expect("the only subscriber of this binary");
    let mut s = settings();
    s.kafka
        .consumer_properties
        .insert("statistics.interval.ms".into(), "100".into());
    assert!(
        s.runner.rewind_records > 0,
        "the source keeps its offsets consumer"
    );
    let topic = unique("quiet");
    create_topics(&s, &[&topic]).await;
    let group = unique("quiet-group");
    let source = source(&s, "quiet", &group, &[&topic], Duration::from_secs(10));
    // A consumer with rdkafka's default context: its reports are logged, so the
    // capture sees them.
    let control: BaseConsumer = lanes_common::kafka::consumer_config(&s.kafka, "control", &group)
        .create()
        .unwrap();
    control.subscribe(&[&topic]).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        let _ = control.poll(Duration::from_millis(50));
    }
    source.close().await;
    let dumps = dumps.lock().unwrap();
    assert!(
        dumps.iter().any(|d| d.contains("\"control#consumer")),
        "the control's statistics were logged: {} dumps",
        dumps.len()
    );
    let ours: Vec<&String> = dumps
        .iter()
        .filter(|d| !d.contains("\"control#consumer"))
        .collect();
    assert!(
        ours.is_empty(),
        "the source logged librdkafka statistics: {}",
        ours[0].chars().take(200).collect::<String>()
    );
}
