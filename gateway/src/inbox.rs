//! The gateway's side of the personal inboxes (seed 8.5), without IO: which connections have
//! their inbox delivered here, which broker replica hears of each device (online, offline,
//! acks, syncs and the periodic heartbeat), and whether an inbox push from a broker names a
//! connection that is still here. The caller sends what these functions return.

use crate::rooms::ConnId;
use axum::extract::ws::Utf8Bytes;
use pixiu_protocol::client::{Id, ServerFrame};
use pixiu_protocol::wire::{DeviceRef, InboxItem, Message};
use pixiu_registry::RoleView;
use std::collections::HashMap;
use std::net::SocketAddr;

/// Devices per `DeviceOnline` heartbeat message.
const HEARTBEAT_BATCH: usize = 256;

/// A message for the broker replica serving a user; `to` is `None` when none is running
/// (the caller drops it and counts `inbox`/`no_broker`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ToBroker {
    pub to: Option<SocketAddr>,
    pub msg: Message,
}

struct Conn<T> {
    uid: u64,
    device: String,
    tx: T,
}

/// The connections whose inbox is delivered here; `T` is what a push is delivered through.
pub(crate) struct Inbox<T> {
    /// this gateway's node-to-node address, where brokers push
    gateway: SocketAddr,
    conns: HashMap<ConnId, Conn<T>>,
}

impl<T> Inbox<T> {
    pub(crate) fn new(gateway: SocketAddr) -> Inbox<T> {
        Inbox {
            gateway,
            conns: HashMap::new(),
        }
    }

    fn dev(&self, conn: ConnId) -> Option<DeviceRef> {
        self.conns.get(&conn).map(|c| DeviceRef {
            uid: c.uid,
            device: c.device.clone(),
            conn,
        })
    }

    fn to_user_broker(brokers: &RoleView, uid: u64, msg: Message) -> ToBroker {
        ToBroker {
            to: pixiu_courier::user_broker(brokers, uid),
            msg,
        }
    }

    /// Connection `conn` of `uid`'s `device` opened: deliver its inbox through `tx` and report
    /// it to the user's broker.
    pub(crate) fn online(
        &mut self,
        brokers: &RoleView,
        conn: ConnId,
        uid: u64,
        device: String,
        tx: T,
    ) -> ToBroker {
        let dev = DeviceRef {
            uid,
            device: device.clone(),
            conn,
        };
        self.conns.insert(conn, Conn { uid, device, tx });
        let msg = Message::DeviceOnline {
            gateway: self.gateway,
            devices: vec![dev],
        };
        Self::to_user_broker(brokers, uid, msg)
    }

    /// Connection `conn` closed; `None` when it was not known.
    pub(crate) fn offline(&mut self, brokers: &RoleView, conn: ConnId) -> Option<ToBroker> {
        let dev = self.dev(conn)?;
        self.conns.remove(&conn);
        let uid = dev.uid;
        Some(Self::to_user_broker(
            brokers,
            uid,
            Message::DeviceOffline(dev),
        ))
    }

    /// The client of `conn` acknowledged its inbox up to `id`.
    pub(crate) fn ack(&self, brokers: &RoleView, conn: ConnId, id: u64) -> Option<ToBroker> {
        let dev = self.dev(conn)?;
        let uid = dev.uid;
        Some(Self::to_user_broker(
            brokers,
            uid,
            Message::DeviceAck { dev, id },
        ))
    }

    /// The client of `conn` asks for its inbox after `after`.
    pub(crate) fn sync(&self, brokers: &RoleView, conn: ConnId, after: u64) -> Option<ToBroker> {
        let dev = self.dev(conn)?;
        let uid = dev.uid;
        let msg = Message::DeviceSync {
            gateway: self.gateway,
            dev,
            after,
        };
        Some(Self::to_user_broker(brokers, uid, msg))
    }

    /// Report every connected device to its broker, in batches (devices whose user has no
    /// running broker are left out).
    pub(crate) fn heartbeat(&self, brokers: &RoleView) -> Vec<(SocketAddr, Message)> {
        let mut by_broker: HashMap<SocketAddr, Vec<DeviceRef>> = HashMap::new();
        for (conn, c) in &self.conns {
            if let Some(b) = pixiu_courier::user_broker(brokers, c.uid) {
                by_broker.entry(b).or_default().push(DeviceRef {
                    uid: c.uid,
                    device: c.device.clone(),
                    conn: *conn,
                });
            }
        }
        let mut out = Vec::new();
        for (b, devices) in by_broker {
            for chunk in devices.chunks(HEARTBEAT_BATCH) {
                let msg = Message::DeviceOnline {
                    gateway: self.gateway,
                    devices: chunk.to_vec(),
                };
                out.push((b, msg));
            }
        }
        out
    }

    /// Where an inbox push for `dev` goes, or the metric reason to drop it.
    pub(crate) fn target(&self, dev: &DeviceRef) -> Result<&T, &'static str> {
        let Some(c) = self.conns.get(&dev.conn) else {
            return Err("no_connection");
        };
        if c.uid != dev.uid || c.device != dev.device {
            return Err("wrong_connection");
        }
        Ok(&c.tx)
    }
}

/// The client frame for one inbox message.
pub(crate) fn frame(m: InboxItem) -> Utf8Bytes {
    let frame = ServerFrame::Inbox {
        id: Id(m.id),
        from: Id(m.from),
        body: m.body,
        ts: m.ts,
        trace: m
            .trace
            .map(|t| t.iter().map(pixiu_protocol::trace::HopJson::from).collect()),
    };
    Utf8Bytes::from(frame.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_registry::{Member, NodeInfo, NodeState};

    fn gw() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// Two broker partitions, one running replica each (port 7000 + partition).
    fn brokers() -> RoleView {
        let mut v = RoleView {
            partition_num: 2,
            ..RoleView::default()
        };
        for p in 0..2u32 {
            let mut info = NodeInfo::new(format!("127.0.0.1:{}", 7000 + p));
            info.state = NodeState::Running;
            let m = Member {
                id: u64::from(p) + 1,
                name: format!("node-{p:010}"),
                info,
            };
            v.partitions.insert(p, vec![m]);
        }
        v
    }

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn device_messages_go_to_the_users_broker() {
        let b = brokers();
        let mut inbox = Inbox::new(gw());
        let on = inbox.online(&b, 1, 3, "phone".into(), ());
        assert_eq!(on.to, addr(7001), "uid 3 is served by partition 1");
        let dev = DeviceRef {
            uid: 3,
            device: "phone".into(),
            conn: 1,
        };
        let want = Message::DeviceOnline {
            gateway: gw(),
            devices: vec![dev.clone()],
        };
        assert_eq!(on.msg, want);
        let ack = inbox.ack(&b, 1, 9).unwrap();
        assert_eq!(
            ack.msg,
            Message::DeviceAck {
                dev: dev.clone(),
                id: 9
            }
        );
        let sync = inbox.sync(&b, 1, 4).unwrap();
        assert_eq!(sync.to, addr(7001));
        assert!(matches!(sync.msg, Message::DeviceSync { after: 4, .. }));
        let off = inbox.offline(&b, 1).unwrap();
        assert_eq!(off.msg, Message::DeviceOffline(dev));
        // gone: nothing more for it
        assert!(inbox.offline(&b, 1).is_none());
        assert!(inbox.ack(&b, 1, 10).is_none());
        assert!(inbox.sync(&b, 1, 0).is_none());
    }

    #[test]
    fn without_a_running_broker_nothing_has_an_address() {
        let mut inbox = Inbox::new(gw());
        let on = inbox.online(&RoleView::default(), 1, 3, "phone".into(), ());
        assert_eq!(on.to, None);
        assert!(inbox.heartbeat(&RoleView::default()).is_empty());
    }

    #[test]
    fn heartbeat_batches_devices_per_broker() {
        let b = brokers();
        let mut inbox = Inbox::new(gw());
        // 300 devices of even users (partition 0), one of an odd user (partition 1)
        for conn in 0..300u64 {
            inbox.online(&b, conn, conn * 2, "d".into(), ());
        }
        inbox.online(&b, 1000, 1, "d".into(), ());
        let mut sizes: Vec<(Option<SocketAddr>, usize)> = inbox
            .heartbeat(&b)
            .into_iter()
            .map(|(to, m)| match m {
                Message::DeviceOnline { devices, .. } => (Some(to), devices.len()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        sizes.sort();
        assert_eq!(
            sizes,
            vec![(addr(7000), 44), (addr(7000), 256), (addr(7001), 1)]
        );
    }

    #[test]
    fn pushes_only_to_the_connection_they_name() {
        let b = brokers();
        let mut inbox = Inbox::new(gw());
        inbox.online(&b, 1, 3, "phone".into(), "tx1");
        let mut dev = DeviceRef {
            uid: 3,
            device: "phone".into(),
            conn: 1,
        };
        assert_eq!(inbox.target(&dev), Ok(&"tx1"));
        dev.device = "laptop".into();
        assert_eq!(inbox.target(&dev), Err("wrong_connection"));
        dev.conn = 2;
        assert_eq!(inbox.target(&dev), Err("no_connection"));
    }
}
