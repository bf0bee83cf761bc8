//! The broker's inbox delivery state machine (seed 8.5), without IO: events in (a device
//! online or heartbeating, offline, an ack, a sync, a Notify, a fetch result, a clock tick),
//! actions out (fetch ids from Pi and messages from Xiu, push to a gateway, save a cursor).
//!
//! Per device: at most one batch is in flight; the next batch is fetched when the device has
//! acknowledged the one in flight (ack "up to id"). A batch not acknowledged within
//! `redeliver_after` is pushed again, at most `max_tries` times in all; then the device is
//! treated as gone (the seed's logout on a delivery error) and catches up when it is back.
//! Pushes go oldest first and a batch starts after the device's acknowledged position, so a
//! device never sees a smaller id after a larger one except as a repeat of one it has seen.

use pixiu_protocol::wire::{DeviceRef, InboxItem};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Messages per pushed batch.
    pub batch: usize,
    pub redeliver_after: Duration,
    pub max_tries: u32,
    /// A device not heard from (heartbeat) for this long is offline.
    pub device_timeout: Duration,
    /// An idle online device re-reads its inbox this often (repairs a lost Notify).
    pub poll_interval: Duration,
    /// Wait before retrying a failed fetch.
    pub retry_after: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            batch: 64,
            redeliver_after: Duration::from_secs(18),
            max_tries: 3,
            device_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(10),
            retry_after: Duration::from_millis(300),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read up to `max` ids of the user after `after` (after the device's cursor in Pi when
    /// `None`), then the messages; answer with [`Delivery::fetched`] and this `epoch`.
    Fetch {
        uid: u64,
        device: String,
        epoch: u64,
        after: Option<u64>,
        max: usize,
    },
    Push {
        gateway: SocketAddr,
        dev: DeviceRef,
        items: Vec<InboxItem>,
    },
    /// The device acknowledged everything up to `id`: record it in Pi.
    SaveCursor { uid: u64, device: String, id: u64 },
}

/// What a fetch found: the messages (oldest first) and the device's cursor in Pi.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub items: Vec<InboxItem>,
    pub cursor: u64,
    /// Ids Pi listed whose messages could not be read (corrupt or missing): skipped.
    pub skipped_upto: Option<u64>,
}

#[derive(Debug)]
struct Dev {
    conn: u64,
    gateway: SocketAddr,
    last_seen: Instant,
    /// Everything up to here was acknowledged (or is known to be in the device's cursor).
    acked: u64,
    /// Fetch after this; `None` until Pi told us the cursor.
    position: Option<u64>,
    inflight: Option<Inflight>,
    /// The last fetch filled a whole batch: more may be waiting.
    full: bool,
    fetching: Option<u64>,
    /// News arrived while fetching: fetch again when it ends.
    again: bool,
    last_fetch: Instant,
    failed: bool,
}

#[derive(Debug)]
struct Inflight {
    items: Vec<InboxItem>,
    sent_at: Instant,
    tries: u32,
}

type Key = (u64, String);

#[derive(Debug, Default)]
pub struct Delivery {
    cfg: DeliveryConfig,
    devices: HashMap<Key, Dev>,
    by_uid: HashMap<u64, HashSet<String>>,
    epoch: u64,
}

impl Delivery {
    pub fn new(cfg: DeliveryConfig) -> Delivery {
        Delivery {
            cfg,
            ..Delivery::default()
        }
    }

    pub fn online_devices(&self) -> usize {
        self.devices.len()
    }

    pub fn inflight(&self) -> usize {
        self.devices
            .values()
            .filter(|d| d.inflight.is_some())
            .count()
    }

    fn fetch(&mut self, key: &Key, now: Instant, out: &mut Vec<Action>) {
        self.epoch += 1;
        let epoch = self.epoch;
        let max = self.cfg.batch;
        if let Some(d) = self.devices.get_mut(key) {
            d.fetching = Some(epoch);
            d.again = false;
            d.failed = false;
            d.last_fetch = now;
            out.push(Action::Fetch {
                uid: key.0,
                device: key.1.clone(),
                epoch,
                after: d.position,
                max,
            });
        }
    }

    fn insert(
        &mut self,
        gateway: SocketAddr,
        dev: &DeviceRef,
        position: Option<u64>,
        now: Instant,
    ) {
        let key = (dev.uid, dev.device.clone());
        self.by_uid
            .entry(dev.uid)
            .or_default()
            .insert(dev.device.clone());
        self.devices.insert(
            key,
            Dev {
                conn: dev.conn,
                gateway,
                last_seen: now,
                acked: 0,
                position,
                inflight: None,
                full: false,
                fetching: None,
                again: false,
                last_fetch: now,
                failed: false,
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        self.devices.remove(key);
        if let Some(set) = self.by_uid.get_mut(&key.0) {
            set.remove(&key.1);
            if set.is_empty() {
                self.by_uid.remove(&key.0);
            }
        }
    }

    /// A login or a heartbeat of a connected device.
    pub fn online(&mut self, gateway: SocketAddr, dev: &DeviceRef, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let key = (dev.uid, dev.device.clone());
        match self.devices.get_mut(&key) {
            Some(d) if d.conn == dev.conn && d.gateway == gateway => d.last_seen = now,
            _ => {
                // a new login, or the same device on a new connection: start from its cursor
                self.insert(gateway, dev, None, now);
                self.fetch(&key, now, &mut out);
            }
        }
        out
    }

    /// Forget every device of the users `owns` says are no longer this broker's (a doubling
    /// gave them to another partition, whose broker resumes from their cursors in Pi).
    /// Returns how many devices were forgotten.
    pub fn retain_users(&mut self, owns: impl Fn(u64) -> bool) -> usize {
        let gone: Vec<Key> = self
            .devices
            .keys()
            .filter(|(uid, _)| !owns(*uid))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
        gone.len()
    }

    /// The device's connection closed (only that connection: a newer one stays).
    pub fn offline(&mut self, dev: &DeviceRef) {
        let key = (dev.uid, dev.device.clone());
        if self.devices.get(&key).is_some_and(|d| d.conn == dev.conn) {
            self.remove(&key);
        }
    }

    /// The user's inbox has news.
    pub fn notify(&mut self, uid: u64, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let devices: Vec<String> = self
            .by_uid
            .get(&uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for device in devices {
            let key = (uid, device);
            let Some(d) = self.devices.get_mut(&key) else {
                continue;
            };
            if d.fetching.is_some() || d.inflight.is_some() {
                d.again = true;
            } else {
                self.fetch(&key, now, &mut out);
            }
        }
        out
    }

    /// An operator's replay: push `items` again to every online device of `uid` (one push
    /// each, outside the redelivery bookkeeping: nothing waits for their acknowledgements,
    /// which cannot move a cursor back).
    pub fn redeliver(&self, uid: u64, items: &[InboxItem]) -> Vec<Action> {
        let Some(devices) = self.by_uid.get(&uid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for device in devices {
            if let Some(d) = self.devices.get(&(uid, device.clone())) {
                out.push(Action::Push {
                    gateway: d.gateway,
                    dev: DeviceRef {
                        uid,
                        device: device.clone(),
                        conn: d.conn,
                    },
                    items: items.to_vec(),
                });
            }
        }
        out
    }

    /// The device acknowledged every id up to `id`.
    pub fn ack(&mut self, dev: &DeviceRef, id: u64, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let key = (dev.uid, dev.device.clone());
        let Some(d) = self.devices.get_mut(&key) else {
            // not online here (e.g. after a broker failover): still worth recording
            out.push(Action::SaveCursor {
                uid: dev.uid,
                device: dev.device.clone(),
                id,
            });
            return out;
        };
        d.last_seen = now;
        if id > d.acked {
            d.acked = id;
            out.push(Action::SaveCursor {
                uid: dev.uid,
                device: dev.device.clone(),
                id,
            });
        }
        d.position = Some(d.position.unwrap_or(0).max(id));
        if let Some(inf) = &mut d.inflight {
            inf.items.retain(|m| m.id > id);
            if inf.items.is_empty() {
                d.inflight = None;
            }
        }
        // seed 8.5: fetch again only when news came meanwhile or the batch was full
        if d.inflight.is_none() && d.fetching.is_none() && (d.again || d.full) {
            self.fetch(&key, now, &mut out);
        }
        out
    }

    /// The device asks for everything after `after`.
    pub fn sync(
        &mut self,
        gateway: SocketAddr,
        dev: &DeviceRef,
        after: u64,
        now: Instant,
    ) -> Vec<Action> {
        let key = (dev.uid, dev.device.clone());
        let mut out = Vec::new();
        match self.devices.get_mut(&key) {
            Some(d) if d.conn == dev.conn => {
                d.last_seen = now;
                d.position = Some(after);
                d.inflight = None;
            }
            _ => self.insert(gateway, dev, Some(after), now),
        }
        self.fetch(&key, now, &mut out);
        out
    }

    /// The answer to an [`Action::Fetch`]; `None` when it failed.
    pub fn fetched(
        &mut self,
        uid: u64,
        device: &str,
        epoch: u64,
        result: Option<Fetched>,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let key = (uid, device.to_string());
        let Some(d) = self.devices.get_mut(&key) else {
            return out;
        };
        if d.fetching != Some(epoch) {
            return out; // superseded (a sync, a new login)
        }
        d.fetching = None;
        let Some(f) = result else {
            d.failed = true;
            return out;
        };
        d.acked = d.acked.max(f.cursor);
        let mut pos = d.position.unwrap_or(f.cursor).max(f.cursor);
        if let Some(s) = f.skipped_upto {
            pos = pos.max(s);
        }
        if let Some(last) = f.items.last() {
            pos = pos.max(last.id);
        }
        d.position = Some(pos);
        d.full = f.items.len() + usize::from(f.skipped_upto.is_some()) >= self.cfg.batch;
        if f.items.is_empty() {
            if d.again || f.skipped_upto.is_some() {
                self.fetch(&key, now, &mut out);
            }
            return out;
        }
        d.inflight = Some(Inflight {
            items: f.items.clone(),
            sent_at: now,
            tries: 1,
        });
        out.push(Action::Push {
            gateway: d.gateway,
            dev: DeviceRef {
                uid,
                device: device.to_string(),
                conn: d.conn,
            },
            items: f.items,
        });
        out
    }

    /// Redelivery, retries, polling and timeouts.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let mut gone = Vec::new();
        let mut to_fetch = Vec::new();
        for (key, d) in self.devices.iter_mut() {
            if now.duration_since(d.last_seen) >= self.cfg.device_timeout {
                gone.push(key.clone());
                continue;
            }
            if let Some(inf) = &mut d.inflight {
                if now.duration_since(inf.sent_at) >= self.cfg.redeliver_after {
                    if inf.tries >= self.cfg.max_tries {
                        gone.push(key.clone());
                        continue;
                    }
                    inf.tries += 1;
                    inf.sent_at = now;
                    out.push(Action::Push {
                        gateway: d.gateway,
                        dev: DeviceRef {
                            uid: key.0,
                            device: key.1.clone(),
                            conn: d.conn,
                        },
                        items: inf.items.clone(),
                    });
                }
                continue;
            }
            if d.fetching.is_some() {
                continue;
            }
            let since = now.duration_since(d.last_fetch);
            if (d.failed && since >= self.cfg.retry_after) || since >= self.cfg.poll_interval {
                to_fetch.push(key.clone());
            }
        }
        for key in gone {
            self.remove(&key);
        }
        for key in to_fetch {
            self.fetch(&key, now, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            batch: 2,
            redeliver_after: Duration::from_secs(1),
            max_tries: 3,
            device_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(5),
            retry_after: Duration::from_millis(100),
        }
    }

    fn gw() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn dev(conn: u64) -> DeviceRef {
        DeviceRef {
            uid: 7,
            device: "phone".into(),
            conn,
        }
    }

    fn item(id: u64) -> InboxItem {
        InboxItem {
            id,
            from: 1,
            body: format!("m{id}"),
            ts: 0,
            trace: None,
        }
    }

    fn epoch_of(actions: &[Action]) -> (u64, Option<u64>) {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Fetch { epoch, after, .. } => Some((*epoch, *after)),
                _ => None,
            })
            .expect("a fetch")
    }

    fn pushed(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .flat_map(|a| match a {
                Action::Push { items, .. } => items.iter().map(|i| i.id).collect(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn login_fetches_from_cursor_then_pushes_and_continues_after_ack() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let a = d.online(gw(), &dev(1), t);
        let (e, after) = epoch_of(&a);
        assert_eq!(after, None, "first fetch starts at the device's cursor");
        let f = Fetched {
            items: vec![item(3), item(4)],
            cursor: 2,
            skipped_upto: None,
        };
        let a = d.fetched(7, "phone", e, Some(f), t);
        assert_eq!(pushed(&a), vec![3, 4]);
        // a notify while in flight does not fetch
        assert!(d.notify(7, t).is_empty());
        // a partial ack keeps the rest in flight
        let a = d.ack(&dev(1), 3, t);
        assert!(matches!(a[0], Action::SaveCursor { id: 3, .. }));
        assert_eq!(a.len(), 1);
        // a full batch (2 of 2): the ack of its last id fetches the next one
        let a = d.ack(&dev(1), 4, t);
        let (_, after) = epoch_of(&a);
        assert_eq!(after, Some(4));
    }

    #[test]
    fn a_replay_goes_to_every_online_device_and_its_acks_move_nothing_back() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        assert!(d.redeliver(7, &[item(3)]).is_empty(), "no device online");
        let (e, _) = epoch_of(&d.online(gw(), &dev(1), t));
        let laptop = DeviceRef {
            uid: 7,
            device: "laptop".into(),
            conn: 2,
        };
        d.online(gw(), &laptop, t);
        let f = Fetched {
            items: vec![item(5)],
            cursor: 4,
            skipped_upto: None,
        };
        d.fetched(7, "phone", e, Some(f), t);
        d.ack(&dev(1), 5, t);
        let a = d.redeliver(7, &[item(3), item(4)]);
        assert_eq!(a.len(), 2, "one push per device");
        assert_eq!(pushed(&a), vec![3, 4, 3, 4]);
        assert!(d.redeliver(8, &[item(3)]).is_empty(), "another user");
        // the device acknowledges the replayed ids: no cursor write, nothing fetched
        assert!(d.ack(&dev(1), 4, t).is_empty());
    }

    #[test]
    fn after_a_short_batch_only_news_causes_a_fetch() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let (e, _) = epoch_of(&d.online(gw(), &dev(1), t));
        let one = |id: u64| Fetched {
            items: vec![item(id)],
            cursor: 0,
            skipped_upto: None,
        };
        d.fetched(7, "phone", e, Some(one(3)), t);
        // 1 of 2: nothing more was waiting, the ack only saves the cursor
        let a = d.ack(&dev(1), 3, t);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(matches!(a[0], Action::SaveCursor { id: 3, .. }));
        // news while the next batch is in flight is fetched once it is acknowledged
        let (e, after) = epoch_of(&d.notify(7, t));
        assert_eq!(after, Some(3));
        d.fetched(7, "phone", e, Some(one(5)), t);
        assert!(d.notify(7, t).is_empty());
        let (_, after) = epoch_of(&d.ack(&dev(1), 5, t));
        assert_eq!(after, Some(5));
    }

    #[test]
    fn unacknowledged_batches_are_redelivered_then_the_device_is_dropped() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let (e, _) = epoch_of(&d.online(gw(), &dev(1), t));
        let f = Fetched {
            items: vec![item(5)],
            cursor: 0,
            skipped_upto: None,
        };
        d.fetched(7, "phone", e, Some(f), t);
        assert!(pushed(&d.tick(t + Duration::from_millis(500))).is_empty());
        assert_eq!(pushed(&d.tick(t + Duration::from_secs(1))), vec![5]);
        assert_eq!(pushed(&d.tick(t + Duration::from_secs(2))), vec![5]);
        // third try was the last
        assert!(d.tick(t + Duration::from_secs(3)).is_empty());
        assert_eq!(d.online_devices(), 0);
    }

    #[test]
    fn stale_fetches_are_ignored_and_sync_restarts_from_its_position() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let (e1, _) = epoch_of(&d.online(gw(), &dev(1), t));
        let a = d.sync(gw(), &dev(1), 10, t);
        let (e2, after) = epoch_of(&a);
        assert_eq!(after, Some(10));
        let f = |ids: &[u64]| Fetched {
            items: ids.iter().map(|i| item(*i)).collect(),
            cursor: 0,
            skipped_upto: None,
        };
        assert!(d.fetched(7, "phone", e1, Some(f(&[1])), t).is_empty());
        assert_eq!(
            pushed(&d.fetched(7, "phone", e2, Some(f(&[11])), t)),
            vec![11]
        );
    }

    #[test]
    fn a_new_connection_replaces_the_old_and_offline_of_the_old_is_ignored() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        d.online(gw(), &dev(1), t);
        let a = d.online(gw(), &dev(2), t);
        assert_eq!(epoch_of(&a).1, None);
        d.offline(&dev(1));
        assert_eq!(d.online_devices(), 1);
        d.offline(&dev(2));
        assert_eq!(d.online_devices(), 0);
        // heartbeats of the same connection do not refetch
        d.online(gw(), &dev(3), t);
        assert!(d.online(gw(), &dev(3), t).is_empty());
    }

    #[test]
    fn failed_fetch_is_retried_and_idle_devices_poll() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let (e, _) = epoch_of(&d.online(gw(), &dev(1), t));
        d.fetched(7, "phone", e, None, t);
        assert!(d.tick(t + Duration::from_millis(50)).is_empty());
        let (e, _) = epoch_of(&d.tick(t + Duration::from_millis(150)));
        let empty = Fetched {
            items: vec![],
            cursor: 4,
            skipped_upto: None,
        };
        assert!(d.fetched(7, "phone", e, Some(empty), t).is_empty());
        let (_, after) = epoch_of(&d.tick(t + Duration::from_secs(6)));
        assert_eq!(after, Some(4));
        // and a device silent for the timeout goes offline
        d.tick(t + Duration::from_secs(11));
        assert_eq!(d.online_devices(), 0);
    }

    #[test]
    fn skipped_ids_move_the_position_past_them() {
        let t = Instant::now();
        let mut d = Delivery::new(cfg());
        let (e, _) = epoch_of(&d.online(gw(), &dev(1), t));
        let f = Fetched {
            items: vec![],
            cursor: 0,
            skipped_upto: Some(9),
        };
        let (_, after) = epoch_of(&d.fetched(7, "phone", e, Some(f), t));
        assert_eq!(after, Some(9));
    }

    #[test]
    fn users_given_to_another_partition_are_forgotten() {
        let mut d = Delivery::new(cfg());
        let now = Instant::now();
        for uid in [4, 5, 6, 7] {
            let dev = DeviceRef {
                uid,
                device: "phone".into(),
                conn: uid,
            };
            d.online(gw(), &dev, now);
        }
        assert_eq!(d.online_devices(), 4);
        // partition 0 of 2 keeps the even uids
        assert_eq!(d.retain_users(|uid| uid % 2 == 0), 2);
        assert_eq!(d.online_devices(), 2);
        assert!(
            d.notify(5, now).is_empty(),
            "a forgotten user is not fetched"
        );
        assert!(!d.notify(4, now).is_empty() || d.inflight() == 0);
        assert_eq!(d.retain_users(|_| true), 0);
    }
}
