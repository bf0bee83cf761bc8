//! Node-to-node messaging for PiXiu over QUIC (quinn) with mutual TLS from a cluster CA.
//!
//! The transport is byte-oriented: it moves opaque [`bytes::Bytes`] between nodes and does not
//! know message types (callers encode/decode). Each node runs one QUIC endpoint that is both
//! server and client. One-way messages ([`Transport::send`]) go through a bounded per-peer queue
//! and are sent as QUIC datagrams when they fit (unreliable, fast) or as a unidirectional stream
//! otherwise (reliable). Requests ([`Transport::request`]) use a bidirectional stream. Everything
//! received is delivered on a bounded [`tokio::sync::mpsc::Receiver<Inbound>`].

mod error;
mod stats;
mod tls;
mod transport;

pub use error::TransportError;
pub use stats::TransportStats;
pub use tls::{generate_dev_tls, TlsMaterial, ALPN, SERVER_NAME};
pub use transport::{Inbound, Responder, Transport, TransportConfig};
