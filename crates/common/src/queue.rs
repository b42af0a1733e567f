//! librdkafka queues that ring a channel when they stop being empty, so the thread
//! serving them can sleep instead of polling on a timer: a client's event queue, and a
//! partition's record queue served in batches.

use std::ffi::{CString, c_void};
use std::marker::PhantomData;
use std::sync::mpsc;

use rdkafka::ClientContext;
use rdkafka::bindings::{self as rd, rd_kafka_message_t, rd_kafka_queue_t, rd_kafka_t};
use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

/// A client's queue with a callback that rings `ring` whenever librdkafka puts an event
/// into it while it is empty. The thread that serves it empties it before it sleeps, so
/// every later event rings. Made and dropped on that thread.
pub(crate) struct EventQueue<'a> {
    queue: *mut rd_kafka_queue_t,
    /// Read by the callback only; freed in `drop`.
    ring: *mut Ring,
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
        Self {
            queue,
            ring: ring_when_filled(queue, ring),
            _client: PhantomData,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        // SAFETY: a live queue handle.
        unsafe { rd::rd_kafka_queue_length(self.queue) == 0 }
    }
}

/// Has librdkafka ring `ring` whenever it puts something into `queue` while it is
/// empty. The returned pointer owns the sender until [`release`] removes the callback.
#[allow(unsafe_code)]
fn ring_when_filled(queue: *mut rd_kafka_queue_t, ring: mpsc::SyncSender<()>) -> *mut Ring {
    unsafe extern "C" fn rung(_: *mut rd_kafka_t, opaque: *mut c_void) {
        // SAFETY: `opaque` is the `ring` box, alive until the callback is removed.
        let ring = unsafe { &*(opaque as *const Ring) };
        let _ = ring.try_send(());
    }
    let ring = Box::into_raw(Box::new(ring));
    // SAFETY: `ring` lives until `release` has removed the callback.
    unsafe { rd::rd_kafka_queue_cb_event_enable(queue, Some(rung), ring.cast()) };
    ring
}

type Ring = mpsc::SyncSender<()>;

/// Removes the callback, frees its ring, then releases the handle.
#[allow(unsafe_code)]
fn release(queue: *mut rd_kafka_queue_t, ring: *mut Ring) {
    // SAFETY: a live handle and its ring, released once, by their owner's `drop`; the
    // callback runs under the queue's lock, so none runs once it is removed.
    unsafe {
        rd::rd_kafka_queue_cb_event_enable(queue, None, std::ptr::null_mut());
        drop(Box::from_raw(ring));
        rd::rd_kafka_queue_destroy(queue);
    }
}

impl Drop for EventQueue<'_> {
    fn drop(&mut self) {
        release(self.queue, self.ring);
    }
}

/// One assigned partition's records, split off the consumer's queue and taken in
/// batches: one call takes what waits, where polling a record at a time cost three
/// clock reads, a lock and an allocation per record (3-4% of `lanes up`'s CPU in a
/// drain). Made and dropped on the consumer's polling thread.
pub(crate) struct RecordQueue<'a> {
    queue: *mut rd_kafka_queue_t,
    topic: String,
    /// Whether records keep their Kafka headers.
    headers: bool,
    taken: Vec<*mut rd_kafka_message_t>,
    /// Read by the callback only; freed in `drop`.
    ring: *mut Ring,
    _client: PhantomData<&'a ()>,
}

#[allow(unsafe_code)]
impl<'a> RecordQueue<'a> {
    /// Splits `topic`/`partition`'s queue off the consumer's, ringing `ring` when
    /// records arrive in it while it is empty. `None` if the client does not know
    /// the partition.
    pub(crate) fn split<C: ClientContext>(
        client: &'a Client<C>,
        topic: &str,
        partition: i32,
        headers: bool,
        ring: mpsc::SyncSender<()>,
    ) -> Option<Self> {
        let name = CString::new(topic).ok()?;
        // SAFETY: a live client and a NUL-terminated name; the handle is released in `drop`.
        let queue = unsafe {
            rd::rd_kafka_queue_get_partition(client.native_ptr(), name.as_ptr(), partition)
        };
        if queue.is_null() {
            return None;
        }
        // SAFETY: a live handle; its records now stay in it.
        unsafe { rd::rd_kafka_queue_forward(queue, std::ptr::null_mut()) };
        Some(Self {
            queue,
            topic: topic.to_string(),
            headers,
            taken: Vec::new(),
            ring: ring_when_filled(queue, ring),
            _client: PhantomData,
        })
    }

    /// Appends to `out` up to `max` records waiting, in order, each copied out (a record
    /// librdkafka delivers as an error comes as its description), and says how many it
    /// took.
    pub(crate) fn take(
        &mut self,
        max: usize,
        out: &mut Vec<Result<OwnedMessage, String>>,
    ) -> usize {
        self.taken.clear();
        self.taken.reserve(max);
        // SAFETY: room for `max` pointers; librdkafka writes the first `n` and hands them over.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue, 0, self.taken.as_mut_ptr(), max)
        };
        let n = usize::try_from(n).unwrap_or(0).min(max);
        // SAFETY: the first `n` were written.
        unsafe { self.taken.set_len(n) };
        for &m in &self.taken {
            // SAFETY: a message librdkafka handed over; destroyed once, after its copy.
            unsafe {
                out.push(self.copy(m));
                rd::rd_kafka_message_destroy(m);
            }
        }
        self.taken.clear();
        n
    }

    /// An owned copy of the live record `m`, or what librdkafka says went wrong.
    unsafe fn copy(&self, m: *mut rd_kafka_message_t) -> Result<OwnedMessage, String> {
        // SAFETY: a live message.
        let (err, partition, offset) = unsafe { ((*m).err, (*m).partition, (*m).offset) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let e = match err {
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                    KafkaError::PartitionEOF(partition)
                }
                e => KafkaError::MessageConsumption(e.into()),
            };
            // SAFETY: a live message; the text is NUL-terminated and lives as long.
            let why = unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_message_errstr(m)) };
            return Err(format!(
                "{e} ({}) at {}/{partition}/{offset}",
                why.to_string_lossy(),
                self.topic
            ));
        }
        // SAFETY: a live message without error.
        Ok(unsafe { owned(m, self.topic.clone(), self.headers) })
    }
}

/// An owned copy of the record `m` of `topic`, with its headers when `headers`.
///
/// # Safety
/// `m` is a live record librdkafka delivered without error.
#[allow(unsafe_code)]
pub(crate) unsafe fn owned(
    m: *mut rd_kafka_message_t,
    topic: String,
    headers: bool,
) -> OwnedMessage {
    // SAFETY: a live message.
    let r = unsafe { &*m };
    // SAFETY: librdkafka's pointers and lengths for this live message.
    let bytes = |p: *const c_void, len: usize| {
        (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec())
    };
    let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    // SAFETY: a live message.
    let at = unsafe { rd::rd_kafka_message_timestamp(m, &mut kind) };
    let timestamp = match kind {
        _ if at == -1 => Timestamp::NotAvailable,
        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => Timestamp::CreateTime(at),
        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
            Timestamp::LogAppendTime(at)
        }
        _ => Timestamp::NotAvailable,
    };
    OwnedMessage::new(
        bytes(r.payload, r.len),
        bytes(r.key, r.key_len),
        topic,
        timestamp,
        r.partition,
        r.offset,
        // SAFETY: a live message.
        if headers {
            unsafe { copy_headers(m) }
        } else {
            None
        },
    )
}

/// A copy of `m`'s headers; `None` when it has none. A name that is not UTF-8 comes
/// with its invalid bytes replaced: rdkafka panics reading such a name, so a hostile
/// producer's header would otherwise stop the loop that looks at it.
#[allow(unsafe_code)]
unsafe fn copy_headers(m: *mut rd_kafka_message_t) -> Option<OwnedHeaders> {
    let mut hdrs = std::ptr::null_mut();
    // SAFETY: a live message; the headers stay owned by it.
    let found = unsafe { rd::rd_kafka_message_headers(m, &mut hdrs) };
    if found != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return None;
    }
    // SAFETY: live headers of a live message.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut owned = OwnedHeaders::new_with_capacity(count);
    for i in 0..count {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0);
        // SAFETY: `i` is below the count; the pointers live as long as the message.
        let err = unsafe { rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name and `size` bytes of value, both live.
        let key = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        owned = owned.insert(Header { key: &key, value });
    }
    Some(owned)
}

impl Drop for RecordQueue<'_> {
    fn drop(&mut self) {
        release(self.queue, self.ring);
    }
}
