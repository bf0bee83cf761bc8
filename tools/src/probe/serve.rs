//! `pixiu-ctl probe --serve ADDR`: rounds until stopped, with Prometheus metrics. A path counts
//! as failed only after it failed in `fail_after` consecutive rounds (default 3), so one lost
//! datagram or one slow round does not page anyone; it counts as healthy again after one round
//! that worked.

use super::{Kind, Report};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};
use std::collections::{BTreeMap, BTreeSet};

/// Consecutive failed rounds before a path counts as failed, by default.
pub const DEFAULT_FAIL_AFTER: u32 = 3;

/// The probe's metrics and the failure streak of every path.
pub struct ProbeMetrics {
    pub registry: prometheus::Registry,
    latency: HistogramVec,
    path_failed: IntGaugeVec,
    failures: IntCounterVec,
    node_failed: IntGaugeVec,
    rounds: IntCounter,
    paths: IntGaugeVec,
    fail_after: u32,
    streak: BTreeMap<(Kind, String), u32>,
    blamed: BTreeSet<[String; 4]>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

impl ProbeMetrics {
    pub fn new(fail_after: u32) -> ProbeMetrics {
        let registry = prometheus::Registry::new();
        let latency = must(HistogramVec::new(
            HistogramOpts::new(
                "pixiu_probe_latency_seconds",
                "Latency of a probe path end to end (hop=\"total\") and each hop's share",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
            &["kind", "path", "hop"],
        ));
        let path_failed = must(IntGaugeVec::new(
            Opts::new(
                "pixiu_probe_path_failed",
                "1 while a path has failed in the last fail_after consecutive rounds",
            ),
            &["kind", "path"],
        ));
        let failures = must(IntCounterVec::new(
            Opts::new(
                "pixiu_probe_failures_total",
                "Failed paths blamed on a node, counted per round once a path counts as failed",
            ),
            &["role", "partition", "node", "addr"],
        ));
        let node_failed = must(IntGaugeVec::new(
            Opts::new(
                "pixiu_probe_node_failed",
                "1 while a path that counts as failed blames this node",
            ),
            &["role", "partition", "node", "addr"],
        ));
        let rounds = must(IntCounter::new(
            "pixiu_probe_rounds_total",
            "Probe rounds completed",
        ));
        let paths = must(IntGaugeVec::new(
            Opts::new("pixiu_probe_paths", "Paths of the last round, by state"),
            &["state"],
        ));
        for c in [
            Box::new(latency.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(path_failed.clone()),
            Box::new(failures.clone()),
            Box::new(node_failed.clone()),
            Box::new(rounds.clone()),
            Box::new(paths.clone()),
        ] {
            must(registry.register(c));
        }
        ProbeMetrics {
            registry,
            latency,
            path_failed,
            failures,
            node_failed,
            rounds,
            paths,
            fail_after: fail_after.max(1),
            streak: BTreeMap::new(),
            blamed: BTreeSet::new(),
        }
    }

    /// Takes in a round; returns the paths that now count as failed.
    pub fn observe(&mut self, r: &Report) -> Vec<String> {
        self.rounds.inc();
        let mut confirmed = Vec::new();
        let mut present = BTreeSet::new();
        let mut blamed = BTreeSet::new();
        for o in &r.outcomes {
            let key = (o.kind, o.path.clone());
            present.insert(key.clone());
            let kind = o.kind.as_str();
            if o.ok {
                self.streak.insert(key, 0);
                self.path_failed.with_label_values(&[kind, &o.path]).set(0);
                if let Some(ms) = o.ms {
                    let total = self.latency.with_label_values(&[kind, &o.path, "total"]);
                    total.observe(ms / 1000.0);
                }
                for h in &o.hops {
                    let hop = self.latency.with_label_values(&[kind, &o.path, &h.hop]);
                    hop.observe(h.ms / 1000.0);
                }
                continue;
            }
            let streak = self.streak.entry(key).or_insert(0);
            *streak += 1;
            if *streak < self.fail_after {
                continue;
            }
            confirmed.push(o.path.clone());
            self.path_failed.with_label_values(&[kind, &o.path]).set(1);
            if let Some(n) = &o.blame {
                let labels = [
                    n.role.to_string(),
                    n.partition.map_or_else(String::new, |p| p.to_string()),
                    n.id.to_string(),
                    n.addr.clone(),
                ];
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                self.failures.with_label_values(&refs).inc();
                blamed.insert(labels);
            }
        }
        // paths the registry no longer gives (a node went, a doubling) are forgotten
        let gone: Vec<_> = self
            .streak
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for (kind, path) in gone {
            let _ = self
                .path_failed
                .remove_label_values(&[kind.as_str(), &path]);
            self.streak.remove(&(kind, path));
        }
        for labels in self.blamed.difference(&blamed) {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = self.node_failed.remove_label_values(&refs);
        }
        for labels in &blamed {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.node_failed.with_label_values(&refs).set(1);
        }
        self.blamed = blamed;
        let failed = r.failed().count() as i64;
        self.paths
            .with_label_values(&["ok"])
            .set(r.outcomes.len() as i64 - failed);
        self.paths.with_label_values(&["failed"]).set(failed);
        confirmed
    }

    /// The gauge of paths that count as failed now.
    pub fn failed_now(&self) -> usize {
        self.streak
            .values()
            .filter(|s| **s >= self.fail_after)
            .count()
    }
}
