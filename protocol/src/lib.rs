//! PiXiu's protocol logic, with no IO: everything here is plain data and pure functions, so it
//! is tested fast and deterministically.
//!
//! - [`ids`]: the snowflake message id, the `GatewayMsgID` layout
//!   (`16-bit gateway instance | 10-bit reserved | 38-bit counter`) and route keys.
//! - [`routing`]: the seed's partition and replica rules (`RoomID % N == PartitionID % N`),
//!   big rooms split into 64 virtual rooms, and which router partitions a broker subscribes to.
//! - [`wire`]: node-to-node messages (what travels in QUIC datagrams and streams) and their codec.
//! - [`client`]: the client WebSocket frames and publisher HTTP bodies of the external contract.
//! - [`auth`]: HS256 tokens for clients and publishers.
//! - [`trace`]: the per-hop stamps of traced messages.

pub mod auth;
pub mod client;
pub mod ids;
pub mod inbox;
pub mod routing;
pub mod table;
pub mod trace;
pub mod wire;

/// Largest message body accepted anywhere (64 KiB), from clients and publishers alike.
pub const MAX_BODY: usize = 64 * 1024;

/// Milliseconds since the Unix epoch, the `ts` of messages.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
