//! Integration tests over real sockets on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pixiu_transport::{
    generate_dev_tls, Inbound, TlsMaterial, Transport, TransportConfig, TransportError,
};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn pair() -> (Transport, Receiver<Inbound>, Transport, Receiver<Inbound>) {
    let tls = TlsMaterial::generate_in_memory().unwrap();
    let (a, ra) = Transport::bind(TransportConfig::new(localhost(), tls.clone()))
        .await
        .unwrap();
    let (b, rb) = Transport::bind(TransportConfig::new(localhost(), tls))
        .await
        .unwrap();
    (a, ra, b, rb)
}

async fn next_message(rx: &mut Receiver<Inbound>) -> (SocketAddr, Bytes) {
    match rx.recv().await.expect("inbound channel open") {
        Inbound::Message { from, bytes } => (from, bytes),
        Inbound::Request { .. } => panic!("unexpected request"),
    }
}

#[tokio::test]
async fn small_messages_arrive_in_order_as_datagrams() {
    timeout(LIMIT, async {
        let (a, _ra, b, mut rb) = pair().await;
        for i in 0..100u32 {
            assert!(a.send(b.local_addr(), Bytes::from(i.to_be_bytes().to_vec())));
        }
        for i in 0..100u32 {
            let (from, bytes) = next_message(&mut rb).await;
            assert_eq!(from, a.local_addr());
            assert_eq!(&bytes[..], &i.to_be_bytes()[..]);
        }
        let sa = a.stats();
        assert_eq!(sa.sent_datagrams, 100);
        assert_eq!(sa.peers, 1);
        assert_eq!(b.stats().received_datagrams, 100);
        a.close().await;
        b.close().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn large_message_arrives_whole_over_a_stream() {
    timeout(LIMIT, async {
        let (a, _ra, b, mut rb) = pair().await;
        let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        assert!(a.send(b.local_addr(), Bytes::from(big.clone())));
        assert!(a.send(b.local_addr(), Bytes::from_static(b"after")));
        let mut got_big = false;
        let mut got_small = false;
        while !(got_big && got_small) {
            let (_, bytes) = next_message(&mut rb).await;
            if bytes.len() == big.len() {
                assert_eq!(&bytes[..], &big[..]);
                got_big = true;
            } else {
                assert_eq!(&bytes[..], b"after");
                got_small = true;
            }
        }
        assert_eq!(a.stats().sent_streams, 1);
        assert_eq!(b.stats().received_streams, 1);
        // Over max_message: refused locally.
        let huge = Bytes::from(vec![0u8; 2 * 1024 * 1024]);
        assert!(!a.send(b.local_addr(), huge));
        assert_eq!(a.stats().dropped_too_large, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn request_response() {
    timeout(LIMIT, async {
        let (a, _ra, b, mut rb) = pair().await;
        let server = tokio::spawn(async move {
            let mut answered = 0;
            while let Some(item) = rb.recv().await {
                if let Inbound::Request { bytes, reply, .. } = item {
                    if &bytes[..] == b"ignore me" {
                        drop(reply);
                    } else {
                        let mut out = b"re:".to_vec();
                        out.extend_from_slice(&bytes);
                        reply.send(Bytes::from(out));
                    }
                    answered += 1;
                    if answered == 3 {
                        break;
                    }
                }
            }
        });
        let to = b.local_addr();
        let r = a
            .request(to, Bytes::from_static(b"ping"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&r[..], b"re:ping");
        let big = Bytes::from(vec![7u8; 300 * 1024]);
        let r = a.request(to, big, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.len(), 3 + 300 * 1024);
        let err = a
            .request(to, Bytes::from_static(b"ignore me"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Stream(_)), "{err:?}");
        server.await.unwrap();
        assert_eq!(a.stats().requests_out, 3);
        assert_eq!(b.stats().requests_in, 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn request_to_dead_port_times_out() {
    timeout(LIMIT, async {
        let tls = TlsMaterial::generate_in_memory().unwrap();
        let (a, _ra) = Transport::bind(TransportConfig::new(localhost(), tls))
            .await
            .unwrap();
        // A bound but silent UDP socket: nothing answers there.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead = silent.local_addr().unwrap();
        let err = a
            .request(
                dead,
                Bytes::from_static(b"hello"),
                Duration::from_millis(500),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout), "{err:?}");
        // Sending to it never blocks.
        assert!(a.send(dead, Bytes::from_static(b"x")));
        a.close().await;
        // After close everything is refused.
        assert!(!a.send(dead, Bytes::from_static(b"x")));
        let err = a
            .request(dead, Bytes::from_static(b"x"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Closed), "{err:?}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn foreign_ca_cannot_deliver() {
    timeout(LIMIT, async {
        let good = TlsMaterial::generate_in_memory().unwrap();
        let evil = TlsMaterial::generate_in_memory().unwrap();
        let (b, mut rb) = Transport::bind(TransportConfig::new(localhost(), good))
            .await
            .unwrap();
        let (e, _re) = Transport::bind(TransportConfig::new(localhost(), evil))
            .await
            .unwrap();
        assert!(e.send(b.local_addr(), Bytes::from_static(b"let me in")));
        let err = e
            .request(
                b.local_addr(),
                Bytes::from_static(b"req"),
                Duration::from_secs(2),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Connect(_) | TransportError::Timeout),
            "{err:?}"
        );
        // Also the other direction: the good node refuses the evil server.
        assert!(b.send(e.local_addr(), Bytes::from_static(b"hi")));
        // poll until both sides have seen the refused handshake (bounded by LIMIT)
        while e.stats().handshake_failures == 0 || b.stats().handshake_failures == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let se = e.stats();
        let sb = b.stats();
        assert!(se.handshake_failures >= 1, "{se:?}");
        assert!(sb.handshake_failures >= 1, "{sb:?}");
        assert!(se.connect_failures >= 1, "{se:?}");
        assert_eq!(se.sent_datagrams + se.sent_streams, 0);
        assert!(
            timeout(Duration::from_millis(300), rb.recv())
                .await
                .is_err(),
            "receiver must get nothing"
        );
        assert_eq!(
            sb.received_datagrams + sb.received_streams + sb.requests_in,
            0
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn random_udp_bytes_do_not_disturb() {
    timeout(LIMIT, async {
        let (a, mut ra, b, mut rb) = pair().await;
        let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for n in 0..200usize {
            let len = 1 + (n * 37) % 1400;
            let mut buf = vec![0u8; len];
            for byte in buf.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *byte = seed as u8;
            }
            // Some packets look like QUIC long headers.
            if n % 3 == 0 {
                buf[0] = 0xc0 | (buf[0] & 0x0f);
            }
            junk.send_to(&buf, b.local_addr()).unwrap();
        }
        // no wait needed: the junk is already in b's socket buffer, ahead of what follows
        assert!(a.send(b.local_addr(), Bytes::from_static(b"still fine")));
        let (from, bytes) = next_message(&mut rb).await;
        assert_eq!(from, a.local_addr());
        assert_eq!(&bytes[..], b"still fine");
        let responder = tokio::spawn(async move {
            if let Some(Inbound::Request { bytes, reply, .. }) = ra.recv().await {
                reply.send(bytes);
            }
        });
        let r = b
            .request(
                a.local_addr(),
                Bytes::from_static(b"q"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(&r[..], b"q");
        responder.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dev_tls_written_once_and_loadable() {
    timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        assert!(generate_dev_tls(&tls_dir).unwrap());
        for f in ["ca.pem", "ca.key", "node.pem", "node.key"] {
            assert!(tls_dir.join(f).exists(), "{f}");
        }
        let ca_before = std::fs::read(tls_dir.join("ca.pem")).unwrap();
        assert!(!generate_dev_tls(&tls_dir).unwrap());
        assert_eq!(std::fs::read(tls_dir.join("ca.pem")).unwrap(), ca_before);

        let m1 = TlsMaterial::load(&tls_dir).unwrap();
        let m2 = TlsMaterial::load(&tls_dir).unwrap();
        let (a, _ra) = Transport::bind(TransportConfig::new(localhost(), m1))
            .await
            .unwrap();
        let (b, mut rb) = Transport::bind(TransportConfig::new(localhost(), m2))
            .await
            .unwrap();
        assert!(a.send(b.local_addr(), Bytes::from_static(b"from disk")));
        let (_, bytes) = next_message(&mut rb).await;
        assert_eq!(&bytes[..], b"from disk");

        // Missing file: the error names it.
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = TlsMaterial::load(&empty).unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
        std::fs::copy(tls_dir.join("ca.pem"), empty.join("ca.pem")).unwrap();
        std::fs::copy(tls_dir.join("node.pem"), empty.join("node.pem")).unwrap();
        std::fs::write(empty.join("node.key"), "garbage").unwrap();
        let err = TlsMaterial::load(&empty).unwrap_err().to_string();
        assert!(err.contains("node.key"), "{err}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn inbound_closes_after_close() {
    timeout(LIMIT, async {
        let (a, _ra, b, mut rb) = pair().await;
        assert!(a.send(b.local_addr(), Bytes::from_static(b"x")));
        let _ = next_message(&mut rb).await;
        b.close().await;
        a.close().await;
        assert!(rb.recv().await.is_none());
    })
    .await
    .unwrap();
}

/// Many small messages, paced in batches the way a busy node sends, all arrive as datagrams,
/// in order, and none is dropped on the sender's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paced_datagram_bursts_all_arrive_in_order() {
    const TOTAL: u32 = 5_000;
    const BATCH: u32 = 500;
    timeout(Duration::from_secs(5), async {
        let (a, _ra, b, mut rb) = pair().await;
        // Warm up: establish the connection first.
        assert!(a.send(b.local_addr(), Bytes::from_static(b"warm")));
        let (_, warm) = next_message(&mut rb).await;
        assert_eq!(&warm[..], b"warm");

        let mut next = 0u32;
        for start in (0..TOTAL).step_by(BATCH as usize) {
            for i in start..start + BATCH {
                assert!(
                    a.send(b.local_addr(), Bytes::from(i.to_be_bytes().to_vec())),
                    "message {i} refused: {:?}",
                    a.stats()
                );
            }
            while next < start + BATCH {
                let (from, bytes) = timeout(Duration::from_secs(2), next_message(&mut rb))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "message {next} did not arrive in 2 s; a={:?} b={:?}",
                            a.stats(),
                            b.stats()
                        )
                    });
                assert_eq!(from, a.local_addr());
                let got = u32::from_be_bytes(bytes[..].try_into().unwrap());
                assert_eq!(got, next, "out of order");
                next += 1;
            }
        }
        let sa = a.stats();
        assert_eq!(sa.dropped_queue_full, 0, "{sa:?}");
        assert_eq!(sa.sent_datagrams, u64::from(TOTAL) + 1, "{sa:?}");
        assert_eq!(sa.sent_streams + sa.send_errors, 0, "{sa:?}");
        let sb = b.stats();
        assert_eq!(sb.received_datagrams, u64::from(TOTAL) + 1, "{sb:?}");
        assert_eq!(sb.dropped_inbound_full, 0, "{sb:?}");
        a.close().await;
        b.close().await;
    })
    .await
    .unwrap();
}
