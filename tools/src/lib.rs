//! Operator tools behind `pixiu-ctl`: create a cluster's layout and development certificates,
//! show its nodes (partitions registered for a doubling marked as not counted), issue tokens,
//! double a role's partitions ([`scale_out`]), probe every path and name the failing hop
//! ([`probe`]), export or redeliver a user's stored messages
//! ([`replay`]), rebuild a lost Pi partition from Xiu ([`rebuild_pi`]), and run one of every
//! role in one process (standalone mode).

pub mod probe;
pub mod rebuild_pi;
pub mod replay;
pub mod scale_out;
pub mod standalone;

use anyhow::Context;
use pixiu_registry::{Layout, Registry, Role, RoleView};

/// Every node of the cluster, as `pixiu-ctl status` prints it.
#[derive(Debug, serde::Serialize)]
pub struct NodeRow {
    pub role: &'static str,
    pub partition: Option<u32>,
    pub id: u64,
    pub state: String,
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    pub load: u64,
    /// For a partitioned role: is the node's partition below `partition_num`? A partition at
    /// or above it was started for a doubling and is not counted (nor routed to) until
    /// `scale-out` doubles `partition_num`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted: Option<bool>,
    /// The role's count this replica reports it works under (routers and brokers): during a
    /// doubling, `partition_num` is in force for a replica once it serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<u32>,
}

#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub cluster: String,
    pub partition_num: std::collections::BTreeMap<&'static str, u32>,
    pub nodes: Vec<NodeRow>,
}

pub async fn status(registry: &Registry) -> anyhow::Result<Status> {
    let mut nodes = Vec::new();
    let mut partition_num = std::collections::BTreeMap::new();
    for role in Role::ALL {
        let view: RoleView = registry
            .read(role)
            .await
            .with_context(|| format!("reading the {} folder", role.as_str()))?;
        if role.is_partitioned() {
            partition_num.insert(role.as_str(), view.partition_num);
        }
        for (p, m) in view.all() {
            nodes.push(NodeRow {
                role: role.as_str(),
                partition: role.is_partitioned().then_some(p),
                id: m.id,
                state: format!("{:?}", m.info.state).to_lowercase(),
                addr: m.info.addr.clone(),
                admin: m.info.admin.clone(),
                client_url: m.info.client_url.clone(),
                http: m.info.http.clone(),
                load: m.info.load,
                counted: role.is_partitioned().then_some(p < view.partition_num),
                serving: m.info.serving,
            });
        }
    }
    Ok(Status {
        cluster: registry.cluster().to_string(),
        partition_num,
        nodes,
    })
}

pub fn render_status(s: &Status) -> String {
    let mut out = format!("cluster {}\n", s.cluster);
    for (role, n) in &s.partition_num {
        let pending: std::collections::BTreeSet<u32> = s
            .nodes
            .iter()
            .filter(|r| r.role == *role && r.counted == Some(false))
            .filter_map(|r| r.partition)
            .collect();
        out.push_str(&format!("  {role}: {n} partition(s)"));
        if !pending.is_empty() {
            let list: Vec<String> = pending.iter().map(u32::to_string).collect();
            out.push_str(&format!(
                "; registered for a doubling, not yet counted: {}",
                list.join(", ")
            ));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<8} {:>9} {:>11} {:<8} {:<22} {}\n",
        "ROLE", "PARTITION", "REPLICA", "STATE", "ADDR", "EXTRA"
    ));
    for n in &s.nodes {
        let extra = [
            n.serving.map(|c| format!("serving {c}")),
            n.client_url.clone(),
            n.http.as_ref().map(|h| format!("http://{h}")),
            n.admin.as_ref().map(|a| format!("admin {a}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        out.push_str(&format!(
            "{:<8} {:>9} {:>11} {:<8} {:<22} {}\n",
            n.role,
            match (n.partition, n.counted) {
                (Some(p), Some(false)) => format!("{p} (new)"),
                (Some(p), _) => p.to_string(),
                (None, _) => "-".into(),
            },
            n.id,
            n.state,
            n.addr,
            extra
        ));
    }
    out
}

/// Check and apply an `init`.
pub async fn init(registry: &Registry, layout: &Layout) -> anyhow::Result<()> {
    registry
        .init_layout(layout)
        .await
        .context("creating the cluster layout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_registry::NodeInfo;

    #[tokio::test]
    async fn partitions_registered_for_a_doubling_show_as_not_counted() {
        let registry = Registry::embedded("t");
        let layout = Layout {
            broker_partitions: 2,
            router_partitions: 1,
            xiu_partitions: 1,
            pi_partitions: 1,
        };
        registry.init_layout(&layout).await.unwrap();
        let mut regs = Vec::new();
        for p in 0..4 {
            let info = NodeInfo::new(format!("127.0.0.1:{}", 7000 + p));
            regs.push(
                registry
                    .register(Role::Broker, Some(p), info)
                    .await
                    .unwrap(),
            );
        }
        let s = status(&registry).await.unwrap();
        let counted = |p: u32| {
            s.nodes
                .iter()
                .find(|r| r.role == "broker" && r.partition == Some(p))
                .and_then(|r| r.counted)
        };
        assert_eq!(
            (counted(0), counted(1), counted(2), counted(3)),
            (Some(true), Some(true), Some(false), Some(false))
        );
        let text = render_status(&s);
        assert!(
            text.contains(
                "broker: 2 partition(s); registered for a doubling, not yet counted: 2, 3"
            ),
            "{text}"
        );
        assert!(text.contains("2 (new)"), "{text}");
        regs[0].update(|i| i.serving = Some(2)).await.unwrap();
        let text = render_status(&status(&registry).await.unwrap());
        assert!(text.contains("serving 2"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["counted"] == false)
                .count(),
            2
        );

        assert_eq!(
            registry.double_partitions(Role::Broker, 2).await.unwrap(),
            4
        );
        let s = status(&registry).await.unwrap();
        assert!(s.nodes.iter().all(|r| r.counted != Some(false)));
        assert!(!render_status(&s).contains("not yet counted"));
        // a doubling based on the old count is refused and changes nothing
        let err = registry
            .double_partitions(Role::Broker, 2)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("partition_num is 4, not 2"),
            "{err}"
        );
        assert_eq!(status(&registry).await.unwrap().partition_num["broker"], 4);
    }
}
