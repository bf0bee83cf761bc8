//! Per-hop tracing (`"trace": true`): a traced message collects one [`Stamp`] per node it
//! passes, and the delivered frame shows them ([`HopJson`]). Untraced messages travel as
//! before (their own wire kinds), so they pay nothing for it.

use crate::client::Id;
use serde::{Deserialize, Serialize};

/// One hop of a traced message, as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// `proxy`, `broker`, `gateway`, `xiu` or `pi`.
    pub role: String,
    /// The node's registry id.
    pub node: u64,
    pub partition: Option<u32>,
    /// The node's registered node-to-node address.
    pub addr: String,
    /// When the message arrived at the node and when the node sent it on, unix µs.
    pub in_us: u64,
    pub out_us: u64,
}

/// One hop as a client sees it in a delivered frame's `trace` array.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopJson {
    pub role: String,
    pub node: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    pub addr: String,
    #[serde(rename = "in")]
    pub in_us: u64,
    #[serde(rename = "out")]
    pub out_us: u64,
}

impl From<&Stamp> for HopJson {
    fn from(s: &Stamp) -> HopJson {
        HopJson {
            role: s.role.clone(),
            node: Id(s.node),
            partition: s.partition,
            addr: s.addr.clone(),
            in_us: s.in_us,
            out_us: s.out_us,
        }
    }
}

/// Microseconds since the Unix epoch, the times of stamps.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_shows_as_the_contract_says() {
        let s = Stamp {
            role: "broker".into(),
            node: 3,
            partition: Some(1),
            addr: "127.0.0.1:9".into(),
            in_us: 10,
            out_us: 12,
        };
        let json = serde_json::to_string(&HopJson::from(&s)).expect("serializable");
        assert_eq!(
            json,
            r#"{"role":"broker","node":"3","partition":1,"addr":"127.0.0.1:9","in":10,"out":12}"#
        );
        let no_partition = HopJson {
            partition: None,
            ..HopJson::from(&s)
        };
        let json = serde_json::to_string(&no_partition).expect("serializable");
        assert!(!json.contains("partition"), "{json}");
    }
}
