//! Ask a peer: one node-to-node request, its answer decoded, and the peer's own refusals
//! (`Refused`, `Unavailable`) turned into typed errors, so callers match only the answers
//! they expect.

use pixiu_protocol::wire::{self, Message, WireError};
use pixiu_transport::{Transport, TransportError};
use std::net::SocketAddr;
use std::time::Duration;

/// Why an [`ask`] got no usable answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AskError {
    /// No answer: connect failure, timeout, closed connection.
    #[error("{to}: {source}")]
    Transport {
        to: SocketAddr,
        #[source]
        source: TransportError,
    },
    /// An answer the codec refuses.
    #[error("{to}: undecodable answer: {source}")]
    Decode {
        to: SocketAddr,
        #[source]
        source: WireError,
    },
    /// The peer refused the request (it will refuse it again).
    #[error("{to} refused: {reason}")]
    Refused { to: SocketAddr, reason: String },
    /// The peer cannot serve it now (not the leader, not enough replicas, ...).
    #[error("{to} unavailable: {reason}")]
    Unavailable { to: SocketAddr, reason: String },
    /// The peer no longer owns what was asked: its role has `partition_num` partitions
    /// (a doubling); ask the owner under that count.
    #[error("{to} moved on to {partition_num} partitions: {reason}")]
    Moved {
        to: SocketAddr,
        partition_num: u32,
        reason: String,
    },
    /// An answer of another kind than the request calls for.
    #[error("{to} answered {kind}, expected {expected}")]
    Unexpected {
        to: SocketAddr,
        kind: &'static str,
        expected: &'static str,
    },
}

impl AskError {
    /// The error for an answer `got` that is not the `expected` kind.
    pub fn unexpected(to: SocketAddr, got: &Message, expected: &'static str) -> AskError {
        AskError::Unexpected {
            to,
            kind: got.kind(),
            expected,
        }
    }

    /// Is it worth asking again, here or elsewhere (everything but a refusal)?
    pub fn is_retryable(&self) -> bool {
        !matches!(self, AskError::Refused { .. })
    }
}

/// Send `msg` to `to` as a request and wait up to `timeout` for its answer.
pub async fn ask(
    transport: &Transport,
    to: SocketAddr,
    msg: &Message,
    timeout: Duration,
) -> Result<Message, AskError> {
    let bytes = transport
        .request(to, wire::encode(msg), timeout)
        .await
        .map_err(|source| AskError::Transport { to, source })?;
    answer(
        to,
        wire::decode(&bytes).map_err(|source| AskError::Decode { to, source })?,
    )
}

/// `to`'s answer `msg` as [`ask`] returns it: its refusals (`Refused`, `Unavailable`,
/// `Moved`) as errors, anything else as the answer.
pub fn answer(to: SocketAddr, msg: Message) -> Result<Message, AskError> {
    match msg {
        Message::Refused { reason } => Err(AskError::Refused { to, reason }),
        Message::Unavailable { reason } => Err(AskError::Unavailable { to, reason }),
        Message::Moved {
            partition_num,
            reason,
        } => Err(AskError::Moved {
            to,
            partition_num,
            reason,
        }),
        answer => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_not_retryable_the_rest_is() {
        let to: SocketAddr = "127.0.0.1:1".parse().expect("a literal address");
        let refused = AskError::Refused {
            to,
            reason: "not ours".into(),
        };
        assert!(!refused.is_retryable());
        assert_eq!(refused.to_string(), "127.0.0.1:1 refused: not ours");
        let other = AskError::unexpected(to, &Message::Done, "pi_log");
        assert!(other.is_retryable());
        assert!(other.to_string().contains("expected pi_log"), "{other}");
    }

    /// Two real transports on loopback: the peer answers in turn `Done`, `Refused`,
    /// `Unavailable` and junk; then it is gone.
    #[tokio::test]
    async fn answers_and_refusals_over_real_sockets() {
        use pixiu_transport::{Inbound, TlsMaterial, TransportConfig};
        let tls = TlsMaterial::generate_in_memory().expect("in-memory TLS");
        let local: SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
        let (me, _my_inbound) = Transport::bind(TransportConfig::new(local, tls.clone()))
            .await
            .expect("binding");
        let (peer, mut inbound) = Transport::bind(TransportConfig::new(local, tls))
            .await
            .expect("binding");
        let to = peer.local_addr();
        let answers = vec![
            wire::encode(&Message::Done),
            wire::encode(&Message::Refused {
                reason: "not ours".into(),
            }),
            wire::encode(&Message::Unavailable {
                reason: "no quorum".into(),
            }),
            bytes::Bytes::from_static(b"junk"),
        ];
        let server = tokio::spawn(async move {
            for answer in answers {
                match inbound.recv().await {
                    Some(Inbound::Request { reply, .. }) => reply.send(answer),
                    other => panic!("expected a request, got {other:?}"),
                }
            }
        });
        let t = Duration::from_secs(5);
        let q = Message::Done;
        assert!(matches!(ask(&me, to, &q, t).await, Ok(Message::Done)));
        let e = ask(&me, to, &q, t).await.expect_err("refused");
        assert!(
            matches!(&e, AskError::Refused { reason, .. } if reason == "not ours"),
            "{e}"
        );
        let e = ask(&me, to, &q, t).await.expect_err("unavailable");
        assert!(
            matches!(&e, AskError::Unavailable { .. }) && e.is_retryable(),
            "{e}"
        );
        let e = ask(&me, to, &q, t).await.expect_err("junk");
        assert!(matches!(e, AskError::Decode { .. }), "{e}");
        server.await.expect("the peer task");
        peer.close().await;
        let e = ask(&me, to, &q, Duration::from_millis(500))
            .await
            .expect_err("nobody there");
        assert!(matches!(e, AskError::Transport { .. }), "{e}");
    }
}
