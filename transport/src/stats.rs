//! The transport's counters: bumped without locks by the endpoint's tasks, read as one
//! [`TransportStats`] snapshot (exported as `pixiu_transport{counter=...}` by each role).

use std::sync::atomic::{AtomicU64, Ordering};

/// Snapshot of the transport counters.
#[derive(Debug, Clone, Default)]
pub struct TransportStats {
    pub sent_datagrams: u64,
    pub sent_streams: u64,
    pub received_datagrams: u64,
    pub received_streams: u64,
    pub requests_in: u64,
    pub requests_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_too_large: u64,
    pub dropped_inbound_full: u64,
    /// Messages dropped because no connection to the peer could be established
    /// (failed attempt, or the peer is in retry back-off).
    pub dropped_no_connection: u64,
    /// Messages refused because the transport is closed.
    pub dropped_closed: u64,
    pub send_errors: u64,
    /// Incoming streams that failed before being read whole (reset, connection lost).
    pub recv_errors: u64,
    /// Failed outgoing connection attempts (including TLS failures).
    pub connect_failures: u64,
    /// TLS/handshake failures, incoming or outgoing (e.g. a peer from another CA).
    pub handshake_failures: u64,
    /// Number of per-peer outbound queues (peers ever sent to or requested).
    pub peers: u64,
    /// QUIC connections currently open on the endpoint (incoming and outgoing).
    pub open_connections: u64,
}

/// The live counters, bumped by the endpoint's tasks.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent_datagrams: AtomicU64,
    pub(crate) sent_streams: AtomicU64,
    pub(crate) received_datagrams: AtomicU64,
    pub(crate) received_streams: AtomicU64,
    pub(crate) requests_in: AtomicU64,
    pub(crate) requests_out: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_too_large: AtomicU64,
    pub(crate) dropped_inbound_full: AtomicU64,
    pub(crate) dropped_no_connection: AtomicU64,
    pub(crate) dropped_closed: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) recv_errors: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Counters {
    /// The counters now, with the number of per-peer queues and open QUIC connections.
    pub(crate) fn snapshot(&self, peers: u64, open_connections: u64) -> TransportStats {
        TransportStats {
            sent_datagrams: get(&self.sent_datagrams),
            sent_streams: get(&self.sent_streams),
            received_datagrams: get(&self.received_datagrams),
            received_streams: get(&self.received_streams),
            requests_in: get(&self.requests_in),
            requests_out: get(&self.requests_out),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_too_large: get(&self.dropped_too_large),
            dropped_inbound_full: get(&self.dropped_inbound_full),
            dropped_no_connection: get(&self.dropped_no_connection),
            dropped_closed: get(&self.dropped_closed),
            send_errors: get(&self.send_errors),
            recv_errors: get(&self.recv_errors),
            connect_failures: get(&self.connect_failures),
            handshake_failures: get(&self.handshake_failures),
            peers,
            open_connections,
        }
    }
}
