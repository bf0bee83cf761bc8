//! Error type of the transport crate.

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS material could not be loaded, generated or used.
    #[error("tls: {0}")]
    Tls(String),
    /// Local I/O failure (socket, file system).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The connection to a peer could not be established (or is in back-off).
    #[error("connect: {0}")]
    Connect(String),
    /// The deadline of a request expired.
    #[error("timed out")]
    Timeout,
    /// A message (or reply) is larger than `max_message`; the value is its size.
    #[error("message too large: {0} bytes")]
    TooLarge(usize),
    /// The transport was closed.
    #[error("transport closed")]
    Closed,
    /// A QUIC stream failed (reset, connection lost, no reply, ...).
    #[error("stream: {0}")]
    Stream(String),
}

/// A copy for every waiter of one failed request (an `io::Error` is copied as its kind and
/// text).
impl Clone for TransportError {
    fn clone(&self) -> Self {
        match self {
            TransportError::Tls(s) => TransportError::Tls(s.clone()),
            TransportError::Io(e) => {
                TransportError::Io(std::io::Error::new(e.kind(), e.to_string()))
            }
            TransportError::Connect(s) => TransportError::Connect(s.clone()),
            TransportError::Timeout => TransportError::Timeout,
            TransportError::TooLarge(n) => TransportError::TooLarge(*n),
            TransportError::Closed => TransportError::Closed,
            TransportError::Stream(s) => TransportError::Stream(s.clone()),
        }
    }
}
