//! Operator tools behind `pixiu-ctl`: create a cluster's layout and development certificates,
//! show its nodes, issue tokens, and run one of every role in one process (standalone mode).

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
        out.push_str(&format!("  {role}: {n} partition(s)\n"));
    }
    out.push_str(&format!(
        "{:<8} {:>9} {:>11} {:<8} {:<22} {}\n",
        "ROLE", "PARTITION", "REPLICA", "STATE", "ADDR", "EXTRA"
    ));
    for n in &s.nodes {
        let extra = [
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
            n.partition
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
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
