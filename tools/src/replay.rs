//! `pixiu-ctl replay --uid U [--since T] [--until T] [--out FILE]`: every stored inbox message
//! of one user received in a window, oldest first, whatever the devices acknowledged, as JSON
//! lines in the `inbox` frame's format; with `--redeliver`, pushed again with their ids to the
//! user's online devices through its brokers, paced ([`redeliver`]). Each Xiu partition's leader answers from its index of
//! messages by user and time (`xiu/src/history.rs`), page by page; every partition is asked,
//! since after a doubling a user's messages lie in a parent and its children. The window,
//! the merge and the output are decided here without IO ([`window`], [`merge`]).

use pixiu_protocol::client::Id;
use pixiu_protocol::wire::{InboxItem, Message, ReadResult};
use pixiu_registry::{Registry, RegistryError, Role};
use pixiu_runtime::{ask, AskError};
use pixiu_transport::Transport;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// Messages asked of a leader per request.
pub const PAGE: u32 = 500;

/// Why an export did not complete (exit 1; what was written is a prefix of the answer).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("xiu partition {0} has no leader registered; its messages cannot be read")]
    NoLeader(u32),
    #[error("xiu partition {partition}: {source}")]
    Ask { partition: u32, source: AskError },
    #[error("broker partition {0} has no running replica; nothing can be pushed")]
    NoBroker(u32),
    #[error("broker partition {partition}: {source}")]
    Broker { partition: u32, source: AskError },
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// A half-open window `[since, until)` of unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub since: u64,
    pub until: u64,
}

/// A time as unix milliseconds or RFC 3339 (`2026-12-02T07:00:00Z`).
pub fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is neither unix milliseconds nor RFC 3339: {e}"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{s:?} is before 1970"))
}

/// The window of `--since` and `--until` (both optional; default: everything).
pub fn window(since: Option<&str>, until: Option<&str>) -> Result<Window, String> {
    let since = since.map(parse_time).transpose()?.unwrap_or(0);
    let until = until.map(parse_time).transpose()?.unwrap_or(u64::MAX);
    if since >= until {
        return Err(format!("--since {since} is not before --until {until}"));
    }
    Ok(Window { since, until })
}

/// What an export found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Export {
    /// Oldest first: by `ts`, then id.
    pub messages: Vec<InboxItem>,
    /// Ids whose record could not be read, with the reason.
    pub unreadable: Vec<(u64, String)>,
    /// Partitions whose messages before a time (unix ms) inside the window have expired.
    pub expired: Vec<(u32, u64)>,
    pub partitions: u32,
}

/// Puts the answers of every partition in one order: by `ts`, then id; each message once.
pub fn merge(mut found: Vec<InboxItem>) -> Vec<InboxItem> {
    found.sort_by_key(|m| (m.ts, m.id));
    found.dedup_by_key(|m| m.id);
    found
}

/// One JSON line per message, in the `inbox` frame's format.
pub fn json_line(m: &InboxItem) -> String {
    serde_json::json!({
        "type": "inbox",
        "id": Id(m.id),
        "from": Id(m.from),
        "body": m.body,
        "ts": m.ts,
    })
    .to_string()
}

/// The Xiu partitions to ask about a user, with their leaders: every counted partition (one
/// without a replica is an error, not an empty answer), and the new partitions of a doubling
/// under way.
pub async fn xiu_leaders(registry: &Registry) -> Result<Vec<(u32, SocketAddr)>, ReplayError> {
    let view = registry.read(Role::Xiu).await?;
    let mut partitions: BTreeSet<u32> = (0..view.partition_num).collect();
    partitions.extend(
        view.partitions
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(p, _)| *p),
    );
    partitions
        .into_iter()
        .map(|p| {
            view.leader_addr(p)
                .map(|a| (p, a))
                .ok_or(ReplayError::NoLeader(p))
        })
        .collect()
}

/// Every stored message of `uid` in `w` on one Xiu partition's leader, page by page; and the
/// time before which that partition's messages have expired (0: none has).
pub async fn history(
    transport: &Transport,
    (partition, leader): (u32, SocketAddr),
    uid: u64,
    w: Window,
) -> Result<(Vec<ReadResult>, u64), ReplayError> {
    let mut out = Vec::new();
    let mut expired = 0;
    let mut after = None;
    loop {
        let req = Message::XiuHistory {
            uid,
            since: w.since,
            until: w.until,
            after,
            max: PAGE,
        };
        let (items, next) = match ask(transport, leader, &req, Duration::from_secs(10)).await {
            Ok(Message::XiuHistoryPage {
                items,
                next,
                expired_before,
            }) => {
                expired = expired.max(expired_before);
                (items, next)
            }
            Ok(other) => {
                let source = AskError::unexpected(leader, &other, "xiu_history_page");
                return Err(ReplayError::Ask { partition, source });
            }
            Err(source) => return Err(ReplayError::Ask { partition, source }),
        };
        out.extend(items);
        match next {
            Some(n) => after = Some(n),
            None => return Ok((out, expired)),
        }
    }
}

/// Reads `uid`'s messages in `w` from the leader of every Xiu partition registered.
pub async fn export(
    registry: &Registry,
    transport: &Transport,
    uid: u64,
    w: Window,
) -> Result<Export, ReplayError> {
    let mut out = Export::default();
    let mut found = Vec::new();
    for leader in xiu_leaders(registry).await? {
        out.partitions += 1;
        let (items, expired_before) = history(transport, leader, uid, w).await?;
        if expired_before > w.since {
            out.expired.push((leader.0, expired_before));
        }
        for item in items {
            match item {
                ReadResult::Found(m) => found.push(m),
                ReadResult::Corrupt { id, reason } | ReadResult::Missing { id, reason } => {
                    out.unreadable.push((id, reason))
                }
                // expired between the index scan and the read: as if it had been before
                ReadResult::Expired { .. } => {}
            }
        }
    }
    out.messages = merge(found);
    Ok(out)
}

/// What a redelivery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Redelivery {
    pub messages: usize,
    /// The most devices one batch reached (a device that went offline meanwhile is not
    /// counted for later batches).
    pub devices: u32,
}

/// Messages per batch and the pause after each, for `rate` messages a second (ten batches
/// a second at most).
pub fn pacing(rate: u32) -> (usize, Duration) {
    let batch = (rate / 10).max(1);
    (
        batch as usize,
        Duration::from_secs_f64(f64::from(batch) / f64::from(rate.max(1))),
    )
}

/// Pushes `messages` again, with their ids, to the online devices of `uid`, through every
/// running replica of its broker partition (each pushes to the devices it tracks), at
/// `rate` messages a second.
pub async fn redeliver(
    registry: &Registry,
    transport: &Transport,
    uid: u64,
    messages: &[InboxItem],
    rate: u32,
) -> Result<Redelivery, ReplayError> {
    let view = registry.read(Role::Broker).await?;
    let partition = pixiu_protocol::routing::user_partition(uid, view.partition_num);
    let brokers = view.running_addrs(partition);
    if brokers.is_empty() {
        return Err(ReplayError::NoBroker(partition));
    }
    let (batch, pause) = pacing(rate);
    let mut out = Redelivery::default();
    for chunk in messages.chunks(batch) {
        let mut devices = 0;
        for &broker in &brokers {
            let req = Message::Redeliver {
                uid,
                items: chunk.to_vec(),
            };
            match ask(transport, broker, &req, Duration::from_secs(5)).await {
                Ok(Message::Redelivered { devices: n }) => devices += n,
                Ok(other) => {
                    let source = AskError::unexpected(broker, &other, "redelivered");
                    return Err(ReplayError::Broker { partition, source });
                }
                Err(source) => return Err(ReplayError::Broker { partition, source }),
            }
        }
        out.messages += chunk.len();
        out.devices = out.devices.max(devices);
        tokio::time::sleep(pause).await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_take_unix_ms_or_rfc3339_and_need_since_before_until() {
        assert_eq!(
            window(None, None).unwrap(),
            Window {
                since: 0,
                until: u64::MAX
            }
        );
        assert_eq!(
            window(Some("1000"), Some("2026-12-02T00:00:00Z")).unwrap(),
            Window {
                since: 1000,
                until: 1_796_169_600_000
            }
        );
        assert_eq!(parse_time("1970-01-01T00:00:01.5+00:00").unwrap(), 1500);
        let err = window(Some("5"), Some("5")).unwrap_err();
        assert!(err.contains("not before"), "{err}");
        let err = window(Some("yesterday"), None).unwrap_err();
        assert!(
            err.contains("neither unix milliseconds nor RFC 3339"),
            "{err}"
        );
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn redelivery_is_paced_in_at_most_ten_batches_a_second() {
        assert_eq!(pacing(100), (10, Duration::from_millis(100)));
        assert_eq!(pacing(5), (1, Duration::from_millis(200)));
        assert_eq!(pacing(0), (1, Duration::from_secs(1)));
    }

    #[test]
    fn partitions_merge_oldest_first_and_each_message_once() {
        let m = |id: u64, ts: u64| InboxItem {
            id,
            from: 1,
            body: format!("m{id}"),
            ts,
            trace: None,
        };
        let merged = merge(vec![m(5, 20), m(1 << 56 | 2, 10), m(3, 20), m(5, 20)]);
        let ids: Vec<u64> = merged.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1 << 56 | 2, 3, 5]);
        assert_eq!(
            json_line(&merged[1]),
            r#"{"body":"m3","from":"1","id":"3","ts":20,"type":"inbox"}"#
        );
    }
}
