//! One decoder for what arrives on a node's transport. A datagram or request whose bytes are not
//! a message is counted (`pixiu_messages_dropped_total{stage="decode",reason="bad_frame"}`),
//! logged at debug with the sender, and, when it was a request, answered `Refused` with the
//! reason, so the asker learns at once instead of waiting for its timeout. A role then matches
//! on the [`Received`] message only.

use crate::RoleMetrics;
use bytes::Bytes;
use pixiu_protocol::wire::{self, Message};
use pixiu_transport::{Inbound, Responder};
use std::net::SocketAddr;

/// A decoded datagram or request.
#[derive(Debug)]
pub enum Received {
    /// A one-way message; `bytes` is the frame as received (to forward it unchanged).
    Message {
        from: SocketAddr,
        msg: Message,
        bytes: Bytes,
    },
    /// A request to answer with `reply`.
    Request {
        from: SocketAddr,
        msg: Message,
        reply: Responder,
    },
}

/// Decode `inbound`; `None` when it was not a message (counted, logged, a request refused),
/// or was a ping asked as a request (answered `Pong` here).
pub fn decode(inbound: Inbound, metrics: &RoleMetrics) -> Option<Received> {
    let (from, bytes, reply) = match inbound {
        Inbound::Message { from, bytes } => (from, bytes, None),
        Inbound::Request { from, bytes, reply } => (from, bytes, Some(reply)),
    };
    match (wire::decode(&bytes), reply) {
        // a ping asked as a request (`pixiu-ctl probe`) is answered here, by every role alike
        (Ok(Message::Ping { seq }), Some(reply)) => {
            reply.send(wire::encode(&Message::Pong { seq }));
            None
        }
        (Ok(msg), None) => Some(Received::Message { from, msg, bytes }),
        (Ok(msg), Some(reply)) => Some(Received::Request { from, msg, reply }),
        (Err(e), reply) => {
            metrics.drop("decode", "bad_frame");
            tracing::debug!(%from, "bad frame: {e}");
            if let Some(reply) = reply {
                refuse(reply, format!("bad frame: {e}"));
            }
            None
        }
    }
}

/// Answer a request `Refused` with `reason`.
pub fn refuse(reply: Responder, reason: impl Into<String>) {
    reply.send(wire::encode(&Message::Refused {
        reason: reason.into(),
    }));
}

/// Count and log a message of a kind this role does not take; a request is refused.
pub fn unexpected(
    metrics: &RoleMetrics,
    role: &str,
    from: SocketAddr,
    msg: &Message,
    reply: Option<Responder>,
) {
    match reply {
        None => {
            metrics.drop("decode", "unexpected_kind");
            tracing::debug!(%from, kind = msg.kind(), "unexpected message");
        }
        Some(reply) => {
            metrics.drop("request", "unexpected");
            tracing::debug!(%from, kind = msg.kind(), "unexpected request");
            refuse(reply, format!("a {role} does not serve {}", msg.kind()));
        }
    }
}

impl Received {
    /// Sender, message and, for a request, its responder.
    pub fn into_parts(self) -> (SocketAddr, Message, Option<Responder>) {
        match self {
            Received::Message { from, msg, .. } => (from, msg, None),
            Received::Request { from, msg, reply } => (from, msg, Some(reply)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> RoleMetrics {
        RoleMetrics::new(&prometheus::Registry::new(), "test")
    }

    fn from() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn a_message_keeps_its_bytes() {
        let m = metrics();
        let bytes = wire::encode(&Message::Ping { seq: 7 });
        let got = decode(
            Inbound::Message {
                from: from(),
                bytes: bytes.clone(),
            },
            &m,
        );
        match got {
            Some(Received::Message { msg, bytes: b, .. }) => {
                assert_eq!(b, bytes);
                assert!(matches!(msg, Message::Ping { seq: 7 }));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_frame_is_counted_and_dropped() {
        let m = metrics();
        let got = decode(
            Inbound::Message {
                from: from(),
                bytes: Bytes::from_static(b"\xff\xffnot a frame"),
            },
            &m,
        );
        assert!(got.is_none());
        assert_eq!(
            m.dropped.with_label_values(&["decode", "bad_frame"]).get(),
            1
        );
    }

    #[tokio::test]
    async fn a_bad_request_is_refused_with_the_reason() {
        let m = metrics();
        let (reply, answer) = Responder::channel();
        let got = decode(
            Inbound::Request {
                from: from(),
                bytes: Bytes::from_static(b"\x00"),
                reply,
            },
            &m,
        );
        assert!(got.is_none());
        match wire::decode(&answer.await.unwrap()).unwrap() {
            Message::Refused { reason } => assert!(reason.starts_with("bad frame"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unexpected_request_is_refused_naming_the_role() {
        let m = metrics();
        let (reply, answer) = Responder::channel();
        unexpected(&m, "proxy", from(), &Message::Ping { seq: 1 }, Some(reply));
        match wire::decode(&answer.await.unwrap()).unwrap() {
            Message::Refused { reason } => assert!(reason.contains("a proxy"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m.dropped
                .with_label_values(&["request", "unexpected"])
                .get(),
            1
        );
    }
}
