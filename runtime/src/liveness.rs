//! Peer liveness by heartbeat (seed 5.2): a peer that has not answered a ping within the
//! timeout is "fake dead" and is skipped, even while its registry node still exists.
//! Pure bookkeeping: the caller passes the time in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Peer {
    first_ping: Instant,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
    last_ping: Option<(u64, Instant)>,
}

#[derive(Debug)]
pub struct Liveness {
    timeout: Duration,
    seq: u64,
    peers: HashMap<SocketAddr, Peer>,
}

impl Liveness {
    pub fn new(timeout: Duration) -> Self {
        Liveness {
            timeout,
            seq: 0,
            peers: HashMap::new(),
        }
    }

    /// Record a ping to `addr`; returns the sequence number to put in it.
    pub fn ping_sent(&mut self, addr: SocketAddr, now: Instant) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        let p = self.peers.entry(addr).or_insert(Peer {
            first_ping: now,
            last_pong: None,
            rtt: None,
            last_ping: None,
        });
        p.last_ping = Some((seq, now));
        seq
    }

    /// Record an answer.
    pub fn pong(&mut self, addr: SocketAddr, seq: u64, now: Instant) {
        if let Some(p) = self.peers.get_mut(&addr) {
            p.last_pong = Some(now);
            if let Some((s, at)) = p.last_ping {
                if s == seq {
                    p.rtt = Some(now.saturating_duration_since(at));
                }
            }
        }
    }

    /// A peer never pinged is presumed alive; one pinged is alive while its last answer (or,
    /// before any answer, its first ping) is within the timeout.
    pub fn is_alive(&self, addr: &SocketAddr, now: Instant) -> bool {
        match self.peers.get(addr) {
            None => true,
            Some(p) => {
                let since = p.last_pong.unwrap_or(p.first_ping);
                now.saturating_duration_since(since) <= self.timeout
            }
        }
    }

    pub fn rtt(&self, addr: &SocketAddr) -> Option<Duration> {
        self.peers.get(addr).and_then(|p| p.rtt)
    }

    /// Forget peers that are no longer in the view.
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        self.peers.retain(|a, _| keep(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_death_detected() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut l = Liveness::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(l.is_alive(&a, t0));
        let s = l.ping_sent(a, t0);
        assert!(l.is_alive(&a, t0 + Duration::from_millis(50)));
        l.pong(a, s, t0 + Duration::from_millis(10));
        assert_eq!(l.rtt(&a), Some(Duration::from_millis(10)));
        l.ping_sent(a, t0 + Duration::from_millis(60));
        // no answer since t0+10
        assert!(l.is_alive(&a, t0 + Duration::from_millis(110)));
        assert!(!l.is_alive(&a, t0 + Duration::from_millis(111)));
        l.retain(|_| false);
        assert!(l.is_alive(&a, t0 + Duration::from_secs(9)));
    }
}
