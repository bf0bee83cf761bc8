//! The stamps of traced personal messages (`"trace": true`), kept by the Xiu leader in memory
//! only, for the last [`CAPACITY`] traced messages: the stamps that came with the store (the
//! proxy's or the sending gateway's), then Xiu's own (in: the store arrived, out: the id was
//! handed to Pi), then the Pi leader's. A broker's `XiuRead` gets them with the message. They
//! are not replicated: after a failover a traced message is delivered with the stamps of the
//! hops after Xiu only. Untraced messages never take the lock (an atomic count says whether
//! any trace is held).

use pixiu_protocol::trace::Stamp;
use pixiu_runtime::Hop;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Traced messages whose stamps are kept.
pub const CAPACITY: usize = 4096;

struct Entry {
    stamps: Vec<Stamp>,
    /// When the store arrived, until Xiu's own stamp is taken (the id goes to Pi).
    xiu_in: Option<u64>,
}

pub(crate) struct Traces {
    held: AtomicUsize,
    map: Mutex<lru::LruCache<u64, Entry>>,
}

impl Traces {
    pub fn new() -> Traces {
        Traces {
            held: AtomicUsize::new(0),
            map: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CAPACITY).expect("the capacity is not zero"),
            )),
        }
    }

    fn map(&self) -> MutexGuard<'_, lru::LruCache<u64, Entry>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn any(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    /// Message `id` was stored with these stamps; it arrived here at `xiu_in` (unix µs).
    pub fn stored(&self, id: u64, stamps: Vec<Stamp>, xiu_in: u64) {
        let mut map = self.map();
        map.put(
            id,
            Entry {
                stamps,
                xiu_in: Some(xiu_in),
            },
        );
        self.held.store(map.len(), Ordering::Relaxed);
    }

    /// The ids among `ids` that are traced, each now stamped by this Xiu node (`hop`) as
    /// leaving for Pi.
    pub fn leaving(&self, ids: impl Iterator<Item = u64>, hop: &Hop) -> Vec<u64> {
        if !self.any() {
            return Vec::new();
        }
        let mut map = self.map();
        let mut traced = Vec::new();
        for id in ids {
            if let Some(e) = map.peek_mut(&id) {
                if let Some(at) = e.xiu_in.take() {
                    e.stamps.push(hop.stamp(at));
                }
                traced.push(id);
            }
        }
        traced
    }

    /// The Pi leader's stamp for the traced `ids` it indexed.
    pub fn indexed(&self, ids: &[u64], pi: &Stamp) {
        let mut map = self.map();
        for id in ids {
            if let Some(e) = map.peek_mut(id) {
                if !e.stamps.iter().any(|s| s.role == "pi") {
                    e.stamps.push(pi.clone());
                }
            }
        }
    }

    /// The stamps of message `id`, if it was traced.
    pub fn of(&self, id: u64) -> Option<Vec<Stamp>> {
        if !self.any() {
            return None;
        }
        self.map().peek(&id).map(|e| e.stamps.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(role: &str) -> Stamp {
        Stamp {
            role: role.into(),
            node: 1,
            partition: None,
            addr: "a".into(),
            in_us: 1,
            out_us: 2,
        }
    }

    #[test]
    fn a_traced_message_collects_xiu_then_pi_and_others_nothing() {
        let t = Traces::new();
        assert_eq!(t.of(5), None);
        assert!(t
            .leaving([5].into_iter(), &Hop::fixed("xiu", 9, Some(0), "x"))
            .is_empty());
        t.stored(7, vec![stamp("proxy")], 100);
        let hop = Hop::fixed("xiu", 9, Some(0), "x");
        assert_eq!(t.leaving([5, 7].into_iter(), &hop), [7]);
        // handed to Pi again (a retry): still one Xiu stamp
        assert_eq!(t.leaving([7].into_iter(), &hop), [7]);
        t.indexed(&[7], &stamp("pi"));
        t.indexed(&[7], &stamp("pi"));
        let roles: Vec<String> = t.of(7).unwrap().into_iter().map(|s| s.role).collect();
        assert_eq!(roles, ["proxy", "xiu", "pi"]);
        assert_eq!(t.of(7).unwrap()[1].in_us, 100);
        assert_eq!(t.of(5), None);
    }

    #[test]
    fn only_the_last_traced_messages_are_kept() {
        let t = Traces::new();
        for id in 0..(CAPACITY as u64 + 10) {
            t.stored(id, Vec::new(), 0);
        }
        assert!(t.of(0).is_none());
        assert!(t.of(CAPACITY as u64 + 9).is_some());
    }
}
