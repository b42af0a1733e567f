//! A librdkafka event queue that rings a channel when it stops being empty, so the
//! thread serving it can sleep instead of polling on a timer.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::mpsc;

use rdkafka::ClientContext;
use rdkafka::bindings::{self as rd, rd_kafka_queue_t, rd_kafka_t};
use rdkafka::client::Client;

/// A client's queue with a callback that rings `ring` whenever librdkafka puts an event
/// into it while it is empty. The thread that serves it empties it before it sleeps, so
/// every later event rings. Made and dropped on that thread.
pub(crate) struct EventQueue<'a> {
    queue: *mut rd_kafka_queue_t,
    /// Read by the callback only, through the pointer it was given.
    _ring: Box<mpsc::SyncSender<()>>,
    _client: PhantomData<&'a ()>,
}

#[allow(unsafe_code)]
impl<'a> EventQueue<'a> {
    /// The main queue: a producer's delivery reports, errors, statistics, logs.
    pub(crate) fn main<C: ClientContext>(
        client: &'a Client<C>,
        ring: mpsc::SyncSender<()>,
    ) -> Self {
        // SAFETY: a live client; the handle is released in `drop`.
        let queue = unsafe { rd::rd_kafka_queue_get_main(client.native_ptr()) };
        Self::ringing(queue, ring)
    }

    /// A consumer's queue: rebalances, commit results, errors, statistics, and records
    /// of partitions whose queues are not split off.
    pub(crate) fn consumer<C: ClientContext>(
        client: &'a Client<C>,
        ring: mpsc::SyncSender<()>,
    ) -> Option<Self> {
        // SAFETY: a live client; NULL without a `group.id`.
        let queue = unsafe { rd::rd_kafka_queue_get_consumer(client.native_ptr()) };
        (!queue.is_null()).then(|| Self::ringing(queue, ring))
    }

    fn ringing(queue: *mut rd_kafka_queue_t, ring: mpsc::SyncSender<()>) -> Self {
        unsafe extern "C" fn rung(_: *mut rd_kafka_t, opaque: *mut c_void) {
            // SAFETY: `opaque` is the `ring` box, kept alive until the callback is removed.
            let ring = unsafe { &*(opaque as *const mpsc::SyncSender<()>) };
            let _ = ring.try_send(());
        }
        let ring = Box::new(ring);
        // SAFETY: `ring` outlives the callback, which `drop` removes first.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(
                queue,
                Some(rung),
                &*ring as *const mpsc::SyncSender<()> as *mut c_void,
            );
        }
        Self {
            queue,
            _ring: ring,
            _client: PhantomData,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        // SAFETY: a live queue handle.
        unsafe { rd::rd_kafka_queue_length(self.queue) == 0 }
    }
}

#[allow(unsafe_code)]
impl Drop for EventQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: removes the callback before `ring` goes, then releases the handle.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue, None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue);
        }
    }
}
