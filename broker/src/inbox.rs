//! The broker's inbox task: runs [`Delivery`] and carries out its actions: Pi reads and
//! cursor writes, Xiu reads, pushes to gateways.

use crate::delivery::{Action, Delivery, DeliveryConfig, Fetched};
use pixiu_protocol::inbox::{device_key, MsgId};
use pixiu_protocol::routing::{owns_user, user_partition};
use pixiu_protocol::wire::{self, DeviceRef, InboxItem, Message, ReadResult};
use pixiu_registry::RoleView;
use pixiu_runtime::{ask, AskError, RoleMetrics, Shutdown};
use pixiu_transport::Transport;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub(crate) enum Event {
    Online {
        gateway: SocketAddr,
        devices: Vec<DeviceRef>,
    },
    Offline(DeviceRef),
    Ack {
        dev: DeviceRef,
        id: u64,
    },
    Sync {
        gateway: SocketAddr,
        dev: DeviceRef,
        after: u64,
    },
    Notify {
        uid: u64,
    },
    /// The broker's partition count grew: forget the users no longer this partition's.
    Retain {
        partition: u32,
        partition_num: u32,
    },
    /// An operator's replay (`pixiu-ctl replay --redeliver`): answered with the devices.
    Redeliver {
        uid: u64,
        items: Vec<InboxItem>,
        reply: pixiu_transport::Responder,
    },
}

struct Done {
    uid: u64,
    device: String,
    epoch: u64,
    result: Option<Fetched>,
}

#[derive(Clone)]
struct Io {
    transport: Transport,
    metrics: RoleMetrics,
    /// This broker as a hop of traced personal messages.
    hop: pixiu_runtime::Hop,
    pis: watch::Receiver<Arc<RoleView>>,
    xius: watch::Receiver<Arc<RoleView>>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) fn spawn(
    cfg: DeliveryConfig,
    transport: Transport,
    metrics: RoleMetrics,
    pis: watch::Receiver<Arc<RoleView>>,
    xius: watch::Receiver<Arc<RoleView>>,
    shutdown: Shutdown,
    hop: pixiu_runtime::Hop,
) -> mpsc::Sender<Event> {
    let (tx, rx) = mpsc::channel(65_536);
    let io = Io {
        transport,
        metrics,
        hop,
        pis,
        xius,
    };
    tokio::spawn(run(Delivery::new(cfg), io, rx, shutdown));
    tx
}

async fn run(mut d: Delivery, io: Io, mut rx: mpsc::Receiver<Event>, shutdown: Shutdown) {
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(4096);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let now = Instant::now();
        let actions = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(ev) = rx.recv() => match ev {
                Event::Online { gateway, devices } => devices
                    .iter()
                    .flat_map(|dev| d.online(gateway, dev, now))
                    .collect(),
                Event::Offline(dev) => {
                    d.offline(&dev);
                    Vec::new()
                }
                Event::Ack { dev, id } => d.ack(&dev, id, now),
                Event::Sync { gateway, dev, after } => d.sync(gateway, &dev, after, now),
                Event::Notify { uid } => d.notify(uid, now),
                Event::Redeliver { uid, items, reply } => {
                    let pushes = d.redeliver(uid, &items);
                    let devices = pushes.len() as u32;
                    reply.send(wire::encode(&Message::Redelivered { devices }));
                    tracing::warn!(uid, messages = items.len(), devices, "redelivering on an operator's request");
                    pushes
                }
                Event::Retain { partition, partition_num } => {
                    let n = d.retain_users(|uid| owns_user(uid, partition, partition_num));
                    tracing::info!(partition_num, devices = n, "forgot the devices of users no longer this partition's");
                    Vec::new()
                }
            },
            Some(done) = done_rx.recv() => d.fetched(done.uid, &done.device, done.epoch, done.result, now),
            _ = tick.tick() => {
                io.metrics.set_queue("inbox_devices", d.online_devices() as i64);
                io.metrics.set_queue("inbox_inflight", d.inflight() as i64);
                d.tick(now)
            }
        };
        for a in actions {
            act(&io, a, &done_tx);
        }
    }
}

fn act(io: &Io, action: Action, done_tx: &mpsc::Sender<Done>) {
    match action {
        Action::Fetch {
            uid,
            device,
            epoch,
            after,
            max,
        } => {
            let io = io.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let result = match fetch(&io, uid, &device, after, max).await {
                    Ok(f) => Some(f),
                    Err(e) => {
                        io.metrics.drop("inbox_fetch", "failed");
                        tracing::debug!(uid, device, "fetching the inbox: {e}");
                        None
                    }
                };
                let _ = done_tx
                    .send(Done {
                        uid,
                        device,
                        epoch,
                        result,
                    })
                    .await;
            });
        }
        Action::Push {
            gateway,
            dev,
            items,
        } => {
            let n = items.len() as u64;
            if io
                .transport
                .send(gateway, wire::encode(&Message::InboxPush { dev, items }))
            {
                io.metrics.add_out("inbox_push", n);
            } else {
                io.metrics.drop("inbox_push", "send_failed");
            }
        }
        Action::SaveCursor { uid, device, id } => {
            let io = io.clone();
            tokio::spawn(async move {
                let msg = Message::PiCursor {
                    uid,
                    device: device_key(&device),
                    id,
                };
                for _ in 0..3 {
                    match pi_request(&io, uid, &msg).await {
                        Ok((_, Message::Done)) => return,
                        Ok((_, other)) => tracing::debug!(uid, "saving a cursor: {}", other.kind()),
                        Err(e) => tracing::debug!(uid, "saving a cursor: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                io.metrics.drop("inbox_cursor", "failed");
            });
        }
    }
}

/// Why an inbox read or cursor write did not happen (the delivery state machine retries).
#[derive(Debug, thiserror::Error)]
enum InboxError {
    #[error("{role} has no partitions")]
    NoPartitions { role: &'static str },
    #[error("{role} partition {partition} has no reachable replica")]
    NoLeader { role: &'static str, partition: u32 },
    #[error(transparent)]
    Ask(#[from] AskError),
}

fn leader_of(
    view: &RoleView,
    role: &'static str,
    partition: u32,
) -> Result<SocketAddr, InboxError> {
    view.leader_addr(partition)
        .ok_or(InboxError::NoLeader { role, partition })
}

/// Ask the Pi leader of `uid`'s partition; the answer with who gave it.
async fn pi_request(io: &Io, uid: u64, msg: &Message) -> Result<(SocketAddr, Message), InboxError> {
    let leader = {
        let pis = io.pis.borrow();
        if pis.partition_num == 0 {
            return Err(InboxError::NoPartitions { role: "pi" });
        }
        leader_of(&pis, "pi", user_partition(uid, pis.partition_num))?
    };
    Ok((
        leader,
        ask(&io.transport, leader, msg, REQUEST_TIMEOUT).await?,
    ))
}

/// Pi: the ids; Xiu: the messages.
#[tracing::instrument(level = "debug", skip_all, fields(uid, device, after))]
async fn fetch(
    io: &Io,
    uid: u64,
    device: &str,
    after: Option<u64>,
    max: usize,
) -> Result<Fetched, InboxError> {
    let started = pixiu_protocol::trace::now_us();
    let read = Message::PiRead {
        uid,
        device: device_key(device),
        after,
        max: max as u32,
    };
    let (ids, cursor) = match pi_request(io, uid, &read).await? {
        (_, Message::PiIds { ids, cursor }) => (ids, cursor),
        (pi, other) => return Err(AskError::unexpected(pi, &other, "pi_ids").into()),
    };
    if ids.is_empty() {
        return Ok(Fetched {
            items: Vec::new(),
            cursor,
            skipped_upto: None,
        });
    }
    // a user's ids come from one xiu partition, or from a parent and its child after a
    // doubling: read each partition's share where the id's partition byte says, keep id order
    let mut by_part: std::collections::BTreeMap<u8, Vec<u64>> = Default::default();
    for id in &ids {
        by_part.entry(MsgId(*id).partition()).or_default().push(*id);
    }
    let mut items: Vec<InboxItem> = Vec::with_capacity(ids.len());
    let mut skipped_upto = None;
    for (p, part_ids) in by_part {
        let leader = leader_of(&io.xius.borrow(), "xiu", u32::from(p))?;
        let read = Message::XiuRead { uid, ids: part_ids };
        match ask(&io.transport, leader, &read, REQUEST_TIMEOUT).await? {
            Message::XiuMessages { items: results } => {
                for r in results {
                    match r {
                        ReadResult::Found(mut m) => {
                            // a traced message: this broker's hop, from the fetch to now
                            if let Some(t) = m.trace.as_mut() {
                                t.push(io.hop.stamp(started));
                            }
                            items.push(m)
                        }
                        ReadResult::Expired { id, .. } => {
                            // retention deleted it; Pi's own retention drops the id soon
                            io.metrics.drop("inbox_read", "expired");
                            tracing::debug!(uid, id, "skipping an expired inbox message");
                            skipped_upto = skipped_upto.max(Some(id));
                        }
                        ReadResult::Corrupt { id, reason } | ReadResult::Missing { id, reason } => {
                            // never delivered as garbage; reported and skipped
                            io.metrics.drop("inbox_read", "unreadable");
                            tracing::error!(uid, id, "skipping an inbox message: {reason}");
                            skipped_upto = skipped_upto.max(Some(id));
                        }
                    }
                }
            }
            other => return Err(AskError::unexpected(leader, &other, "xiu_messages").into()),
        }
    }
    items.sort_by_key(|m| m.id);
    Ok(Fetched {
        items,
        cursor,
        skipped_upto,
    })
}
