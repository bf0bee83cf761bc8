//! `pixiu-ctl scale-out ROLE`: double a partitioned role from `N` to `2N` partitions (seed 4.1,
//! 7.2 to 7.4). The operator first starts replicas of partitions `N .. 2N-1`; each loads its
//! share from its parent partition `p % N` and turns `running`. The tool then:
//!
//! 1. **plans** from the registry alone ([`plan`], no IO): refuse when a new partition has no
//!    replica (naming each and a command line that would start one), finish a doubling a
//!    stopped run had flipped, or say there is nothing to do;
//! 2. **waits** until every replica of every new partition is `running` (or times out, leaving
//!    `partition_num` as it was: the cluster keeps serving under `N`);
//! 3. **records** the doubling as under way, then **flips** `partition_num` to `2N` with one
//!    conditional write (of two racing operators one wins, the other is told);
//! 4. **waits** until every replica of the role reports it serves `2N` (`NodeInfo::serving`:
//!    it routes by `2N` and dropped what it no longer owns), then records it as done.
//!
//! Every step is idempotent, so a run stopped anywhere is finished by running it again.
//! Every partitioned role can be doubled; Xiu up to 256 partitions (the MsgID's partition
//! byte), which the tool refuses to exceed before changing anything.

use pixiu_registry::{Doubling, Registry, RegistryError, Role, RoleView};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Roles whose replicas implement the doubling (load from the parent, drop after the flip,
/// report `serving`).
pub const DOUBLING_ROLES: &[Role] = &[Role::Router, Role::Broker, Role::Xiu, Role::Pi];

/// The most partitions `role` can have: Xiu's MsgID names its partition in one byte.
pub fn max_partitions(role: Role) -> u32 {
    match role {
        Role::Xiu => 256,
        _ => u32::MAX,
    }
}

/// What a run of `scale-out` will do, decided from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// No doubling is under way or wanted: `partition_num` is what the last doubling made it.
    Nothing {
        partition_num: u32,
        last: Option<Doubling>,
    },
    /// A new partition has no replica (or none was started at all).
    Refuse { from: u32, missing: Vec<u32> },
    /// Replicas are registered beyond the next doubling.
    TooFar { from: u32, beyond: Vec<u32> },
    /// Wait for the new partitions, flip from `from` to `to`, wait for every replica.
    Double { from: u32, to: u32 },
    /// `partition_num` is already `to` (a run was stopped after its flip): wait for every
    /// replica to serve it.
    Finish { from: u32, to: u32 },
}

/// The plan for `view` (the role's registry view) given the last recorded doubling.
pub fn plan(view: &RoleView, last: Option<Doubling>) -> Plan {
    let n = view.partition_num;
    if let Some(d) = last.filter(|d| d.to == n && d.done_ms.is_none()) {
        return Plan::Finish {
            from: d.from,
            to: d.to,
        };
    }
    let registered: BTreeSet<u32> = view
        .partitions
        .iter()
        .filter(|(p, members)| **p >= n && !members.is_empty())
        .map(|(p, _)| *p)
        .collect();
    let to = n.saturating_mul(2);
    let beyond: Vec<u32> = registered.iter().copied().filter(|p| *p >= to).collect();
    if !beyond.is_empty() {
        return Plan::TooFar { from: n, beyond };
    }
    if registered.is_empty() && last.is_some_and(|d| d.to == n) {
        return Plan::Nothing {
            partition_num: n,
            last,
        };
    }
    let missing: Vec<u32> = (n..to).filter(|p| !registered.contains(p)).collect();
    if !missing.is_empty() {
        return Plan::Refuse { from: n, missing };
    }
    Plan::Double { from: n, to }
}

/// Replicas (partition, registry id) that do not yet report serving `partition_num`.
pub fn lagging(view: &RoleView, partition_num: u32) -> Vec<(u32, u64)> {
    view.all()
        .filter(|(_, m)| m.info.serving != Some(partition_num))
        .map(|(p, m)| (p, m.id))
        .collect()
}

/// Replicas of partitions `from .. to` that are not `running`, and such partitions with none.
pub fn not_running(view: &RoleView, from: u32, to: u32) -> Vec<String> {
    let mut out = Vec::new();
    for p in from..to {
        let members = view.members(p);
        if members.is_empty() {
            out.push(format!("partition {p}: no replica"));
        }
        for m in members.iter().filter(|m| !m.is_running()) {
            out.push(format!("partition {p} replica {} ({})", m.id, m.info.addr));
        }
    }
    out
}

/// Why a scale-out stopped without finishing (exit status 1; the cluster keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ScaleOutError {
    #[error("{0}")]
    Refused(String),
    #[error("timed out after {secs} s waiting for {what}: {pending}")]
    TimedOut {
        secs: u64,
        what: &'static str,
        pending: String,
    },
    #[error("another scale-out changed {role} partition_num to {found} meanwhile; run `pixiu-ctl status` and try again")]
    Raced { role: Role, found: u32 },
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// One step of a run and how long it took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub step: String,
    pub seconds: f64,
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub role: String,
    pub from: u32,
    pub to: u32,
    pub outcome: String,
    pub steps: Vec<Step>,
}

/// How a run behaves.
#[derive(Clone, Debug)]
pub struct Options {
    pub role: Role,
    pub timeout: Duration,
    pub dry_run: bool,
    /// How replicas of the new partitions are started, for the refusal's command lines.
    pub zk: String,
    pub cluster: String,
}

/// The command line that would start a replica of `partition` of `role`.
pub fn start_command(o: &Options, partition: u32) -> String {
    let role = o.role.as_str();
    format!(
        "pixiu-{role} --zk {} --cluster {} --partition {partition} --data-dir /var/lib/pixiu/{role}-p{partition} --listen <ip:port> --tls-dir <dir>",
        o.zk, o.cluster
    )
}

/// Run `scale-out` against `registry`; `say` prints each step as it starts.
pub async fn run(
    registry: &Registry,
    o: &Options,
    mut say: impl FnMut(&str),
) -> Result<Report, ScaleOutError> {
    if !DOUBLING_ROLES.contains(&o.role) {
        return Err(ScaleOutError::Refused(format!(
            "the {} has no partitions to double; broker, router, xiu and pi do",
            o.role.as_str()
        )));
    }
    let view = registry.read(o.role).await?;
    let last = registry.last_doubling(o.role).await?;
    let mut report = Report {
        role: o.role.as_str().to_string(),
        from: view.partition_num,
        to: view.partition_num,
        ..Report::default()
    };
    let plan = plan(&view, last);
    let max = max_partitions(o.role);
    if let Plan::Double { from, .. } | Plan::Refuse { from, .. } = plan {
        if u64::from(from) * 2 > u64::from(max) {
            return Err(ScaleOutError::Refused(format!(
                "refusing to double the {} from {from} to {}: it can have at most {max} partitions (a message id names its xiu partition in one byte)",
                o.role.as_str(),
                u64::from(from) * 2
            )));
        }
    }
    say(&describe(&plan, o));
    let (from, to) = match plan {
        Plan::Nothing { .. } => {
            report.outcome = "nothing to do".into();
            return Ok(report);
        }
        Plan::Refuse { .. } | Plan::TooFar { .. } => {
            return Err(ScaleOutError::Refused(describe(&plan, o)))
        }
        Plan::Double { from, to } | Plan::Finish { from, to } => (from, to),
    };
    report.from = from;
    report.to = to;
    if o.dry_run {
        report.outcome = "dry run: nothing changed".into();
        return Ok(report);
    }
    if matches!(plan, Plan::Double { .. }) {
        let what = "every replica of the new partitions to be running";
        say(&format!("waiting for {what}"));
        let started = Instant::now();
        wait_until(registry, o, what, |v| not_running(v, from, to), &mut say).await?;
        report.steps.push(step("new partitions running", started));
        let started = Instant::now();
        let under_way = Doubling {
            from,
            to,
            done_ms: None,
        };
        registry.record_doubling(o.role, under_way).await?;
        match registry.double_partitions(o.role, from).await {
            Ok(_) => {}
            Err(RegistryError::PartitionNumChanged { found, .. }) => {
                return Err(ScaleOutError::Raced {
                    role: o.role,
                    found,
                })
            }
            Err(e) => return Err(e.into()),
        }
        say(&format!("partition_num is now {to}"));
        report.steps.push(step("partition_num flipped", started));
    }
    let what = "every replica to serve the new count";
    say(&format!("waiting for {what}"));
    let started = Instant::now();
    let lag = |v: &RoleView| -> Vec<String> {
        lagging(v, to)
            .into_iter()
            .map(|(p, id)| format!("partition {p} replica {id}"))
            .collect()
    };
    wait_until(registry, o, what, lag, &mut say).await?;
    report
        .steps
        .push(step("every replica serves the new count", started));
    let done = Doubling {
        from,
        to,
        done_ms: Some(pixiu_protocol::now_ms()),
    };
    registry.record_doubling(o.role, done).await?;
    report.outcome = format!("doubled from {from} to {to} partitions");
    Ok(report)
}

fn step(name: &str, started: Instant) -> Step {
    Step {
        step: name.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Wait until `pending` of the role's view is empty, or `o.timeout` passes; every
/// [`PROGRESS`] without a change, `say` what is still awaited.
async fn wait_until(
    registry: &Registry,
    o: &Options,
    what: &'static str,
    pending: impl Fn(&RoleView) -> Vec<String>,
    say: &mut impl FnMut(&str),
) -> Result<(), ScaleOutError> {
    let mut views = registry.watch(o.role).await?;
    let deadline = tokio::time::Instant::now() + o.timeout;
    loop {
        let left = pending(&views.borrow_and_update());
        if left.is_empty() {
            return Ok(());
        }
        let next = deadline.min(tokio::time::Instant::now() + PROGRESS);
        match tokio::time::timeout_at(next, views.changed()).await {
            Ok(Ok(())) => {}
            Err(_) if next < deadline => say(&format!("still waiting for {}", left.join(", "))),
            _ => {
                return Err(ScaleOutError::TimedOut {
                    secs: o.timeout.as_secs(),
                    what,
                    pending: left.join(", "),
                })
            }
        }
    }
}

/// How often a wait says what it still waits for.
const PROGRESS: Duration = Duration::from_secs(5);

/// One line saying what `plan` means for the operator.
pub fn describe(plan: &Plan, o: &Options) -> String {
    let role = o.role.as_str();
    match plan {
        Plan::Nothing {
            partition_num,
            last,
        } => match last {
            Some(d) => format!(
                "nothing to do: the {role} was doubled from {} to {} partitions and no new partition is registered",
                d.from, d.to
            ),
            None => format!("nothing to do: the {role} has {partition_num} partitions"),
        },
        Plan::Refuse { from, missing } => {
            let cmds: Vec<String> = missing
                .iter()
                .map(|p| format!("partition {p}: {}", start_command(o, *p)))
                .collect();
            format!(
                "refusing to double the {role} from {from} to {}: no replica of {}; start them first ({})",
                from * 2,
                list(missing),
                cmds.join("; ")
            )
        }
        Plan::TooFar { from, beyond } => format!(
            "refusing to double the {role} from {from}: partitions {} are beyond {}; stop them",
            list(beyond),
            from * 2 - 1
        ),
        Plan::Double { from, to } => {
            format!("doubling the {role} from {from} to {to} partitions")
        }
        Plan::Finish { from, to } => format!(
            "finishing the doubling of the {role} from {from} to {to} (partition_num is already {to})"
        ),
    }
}

fn list(ps: &[u32]) -> String {
    let names: Vec<String> = ps.iter().map(|p| format!("partition {p}")).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_registry::{Member, NodeInfo, NodeState};
    use std::collections::BTreeMap;

    fn member(id: u64, running: bool, serving: Option<u32>) -> Member {
        let mut info = NodeInfo::new(format!("127.0.0.1:{}", 7000 + id));
        info.state = if running {
            NodeState::Running
        } else {
            NodeState::Init
        };
        info.serving = serving;
        Member {
            id,
            name: format!("node-{id:010}"),
            info,
        }
    }

    fn view(n: u32, parts: &[(u32, Vec<Member>)]) -> RoleView {
        RoleView {
            partition_num: n,
            partitions: parts.iter().cloned().collect::<BTreeMap<_, _>>(),
        }
    }

    fn done(from: u32, to: u32) -> Option<Doubling> {
        Some(Doubling {
            from,
            to,
            done_ms: Some(1),
        })
    }

    #[test]
    fn a_doubling_needs_a_replica_of_every_new_partition() {
        let two = view(
            2,
            &[
                (0, vec![member(1, true, Some(2))]),
                (1, vec![member(2, true, Some(2))]),
            ],
        );
        assert_eq!(
            plan(&two, None),
            Plan::Refuse {
                from: 2,
                missing: vec![2, 3]
            }
        );
        let mut one_new = two.clone();
        one_new.partitions.insert(2, vec![member(3, false, None)]);
        one_new.partitions.insert(3, vec![]);
        assert_eq!(
            plan(&one_new, None),
            Plan::Refuse {
                from: 2,
                missing: vec![3]
            }
        );
        one_new.partitions.insert(3, vec![member(4, false, None)]);
        assert_eq!(plan(&one_new, None), Plan::Double { from: 2, to: 4 });
        one_new.partitions.insert(5, vec![member(5, false, None)]);
        assert_eq!(
            plan(&one_new, None),
            Plan::TooFar {
                from: 2,
                beyond: vec![5]
            }
        );
    }

    #[test]
    fn a_rerun_after_success_does_nothing_and_after_a_stop_finishes() {
        let doubled = view(
            2,
            &[
                (0, vec![member(1, true, Some(2))]),
                (1, vec![member(2, true, Some(2))]),
            ],
        );
        assert!(matches!(
            plan(&doubled, done(1, 2)),
            Plan::Nothing {
                partition_num: 2,
                ..
            }
        ));
        let under_way = Some(Doubling {
            from: 1,
            to: 2,
            done_ms: None,
        });
        assert_eq!(plan(&doubled, under_way), Plan::Finish { from: 1, to: 2 });
        // an intent recorded for a flip that never happened is not a reason to finish
        let stale = Some(Doubling {
            from: 2,
            to: 4,
            done_ms: None,
        });
        assert_eq!(
            plan(&doubled, stale),
            Plan::Refuse {
                from: 2,
                missing: vec![2, 3]
            }
        );
        // after a completed doubling, the next one is planned as usual
        let mut next = doubled.clone();
        next.partitions.insert(2, vec![member(3, true, Some(2))]);
        next.partitions.insert(3, vec![member(4, true, Some(2))]);
        assert_eq!(plan(&next, done(1, 2)), Plan::Double { from: 2, to: 4 });
    }

    #[test]
    fn waiting_names_the_replicas_still_behind() {
        let v = view(
            2,
            &[
                (0, vec![member(1, true, Some(2)), member(7, true, Some(1))]),
                (1, vec![member(2, false, None)]),
                (3, vec![]),
            ],
        );
        assert_eq!(lagging(&v, 2), vec![(0, 7), (1, 2)]);
        assert_eq!(
            not_running(&v, 1, 4),
            vec![
                "partition 1 replica 2 (127.0.0.1:7002)".to_string(),
                "partition 2: no replica".to_string(),
                "partition 3: no replica".to_string()
            ]
        );
    }

    #[test]
    fn the_refusal_names_each_partition_and_how_to_start_it() {
        let o = Options {
            role: Role::Router,
            timeout: Duration::from_secs(1),
            dry_run: false,
            zk: "zk:2181".into(),
            cluster: "c".into(),
        };
        let text = describe(
            &Plan::Refuse {
                from: 2,
                missing: vec![2, 3],
            },
            &o,
        );
        assert!(
            text.contains("no replica of partition 2, partition 3"),
            "{text}"
        );
        assert!(
            text.contains("pixiu-router --zk zk:2181 --cluster c --partition 3"),
            "{text}"
        );
    }

    async fn one_of_each() -> Registry {
        let registry = Registry::embedded("t");
        let layout = pixiu_registry::Layout {
            broker_partitions: 1,
            router_partitions: 1,
            xiu_partitions: 1,
            pi_partitions: 1,
        };
        registry.init_layout(&layout).await.unwrap();
        registry
    }

    #[tokio::test]
    async fn xiu_beyond_256_partitions_is_refused_before_anything_changes() {
        let registry = one_of_each().await;
        registry.set_partition_num(Role::Xiu, 256).await.unwrap();
        let _new = registry
            .register(Role::Xiu, Some(256), NodeInfo::new("127.0.0.1:1"))
            .await
            .unwrap();
        let o = Options {
            role: Role::Xiu,
            timeout: Duration::from_secs(1),
            dry_run: false,
            zk: "zk".into(),
            cluster: "t".into(),
        };
        let err = run(&registry, &o, |_| {}).await.unwrap_err();
        assert!(err.to_string().contains("at most 256 partitions"), "{err}");
        assert_eq!(registry.read(Role::Xiu).await.unwrap().partition_num, 256);
        assert_eq!(registry.last_doubling(Role::Xiu).await.unwrap(), None);
        // Pi has no such limit: its refusal is the missing replicas
        registry.set_partition_num(Role::Pi, 256).await.unwrap();
        let pi = Options {
            role: Role::Pi,
            ..o
        };
        let err = run(&registry, &pi, |_| {}).await.unwrap_err();
        assert!(
            err.to_string().contains("no replica of partition 256"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_new_partition_that_never_runs_times_out_and_changes_nothing() {
        let registry = one_of_each().await;
        let _old = registry
            .register(Role::Router, Some(0), NodeInfo::new("127.0.0.1:1"))
            .await
            .unwrap();
        let _new = registry
            .register(Role::Router, Some(1), NodeInfo::new("127.0.0.1:2"))
            .await
            .unwrap();
        let o = Options {
            role: Role::Router,
            timeout: Duration::from_millis(200),
            dry_run: false,
            zk: "zk".into(),
            cluster: "t".into(),
        };
        let dry = run(
            &registry,
            &Options {
                dry_run: true,
                ..o.clone()
            },
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!((dry.from, dry.to), (1, 2));
        let err = run(&registry, &o, |_| {}).await.unwrap_err();
        assert!(matches!(err, ScaleOutError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("partition 1 replica"), "{err}");
        assert_eq!(registry.read(Role::Router).await.unwrap().partition_num, 1);
        assert_eq!(registry.last_doubling(Role::Router).await.unwrap(), None);
    }
}
