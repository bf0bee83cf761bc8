//! `pixiu-ctl replay --uid U [--since T] [--until T] [--out FILE]`: every stored inbox message
//! of one user received in a window, oldest first, whatever the devices acknowledged, as JSON
//! lines in the `inbox` frame's format. Each Xiu partition's leader answers from its index of
//! messages by user and time (`xiu/src/history.rs`), page by page; every partition is asked,
//! since after a doubling a user's messages lie in a parent and its children. The window,
//! the merge and the output are decided here without IO ([`window`], [`merge`]).

use pixiu_protocol::client::Id;
use pixiu_protocol::wire::{InboxItem, Message, ReadResult};
use pixiu_registry::{Registry, RegistryError, Role};
use pixiu_runtime::{ask, AskError};
use pixiu_transport::Transport;
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

/// Reads `uid`'s messages in `w` from the leader of every Xiu partition registered.
pub async fn export(
    registry: &Registry,
    transport: &Transport,
    uid: u64,
    w: Window,
) -> Result<Export, ReplayError> {
    let view = registry.read(Role::Xiu).await?;
    let mut out = Export::default();
    let mut found = Vec::new();
    // every counted partition (one without a replica is an error, not an empty answer), and
    // the new partitions of a doubling under way
    let mut partitions: std::collections::BTreeSet<u32> = (0..view.partition_num).collect();
    partitions.extend(
        view.partitions
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(p, _)| *p),
    );
    for partition in partitions {
        let leader = view
            .leader_addr(partition)
            .ok_or(ReplayError::NoLeader(partition))?;
        out.partitions += 1;
        let mut after = None;
        loop {
            let req = Message::XiuHistory {
                uid,
                since: w.since,
                until: w.until,
                after,
                max: PAGE,
            };
            let answer = ask(transport, leader, &req, Duration::from_secs(10)).await;
            let (items, next) = match answer {
                Ok(Message::XiuHistoryPage { items, next }) => (items, next),
                Ok(other) => {
                    let source = AskError::unexpected(leader, &other, "xiu_history_page");
                    return Err(ReplayError::Ask { partition, source });
                }
                Err(source) => return Err(ReplayError::Ask { partition, source }),
            };
            for item in items {
                match item {
                    ReadResult::Found(m) => found.push(m),
                    ReadResult::Corrupt { id, reason } | ReadResult::Missing { id, reason } => {
                        out.unreadable.push((id, reason))
                    }
                }
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    out.messages = merge(found);
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
    fn partitions_merge_oldest_first_and_each_message_once() {
        let m = |id: u64, ts: u64| InboxItem {
            id,
            from: 1,
            body: format!("m{id}"),
            ts,
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
