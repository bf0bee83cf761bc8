//! Per-role Prometheus metrics: messages in, out and dropped per stage, queue depths,
//! connections, and the transport's counters. One `prometheus::Registry` may hold several roles
//! (standalone mode); the constant label `role` keeps them apart.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct RoleMetrics {
    pub messages_in: IntCounterVec,
    pub messages_out: IntCounterVec,
    pub dropped: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub connections: IntGauge,
    /// Peers a role can use right now, by kind (e.g. the proxy's routable broker replicas).
    pub peers: IntGaugeVec,
    transport: IntGaugeVec,
}

fn opts(name: &str, help: &str, role: &str) -> Opts {
    Opts::new(name, help).const_label("role", role)
}

impl RoleMetrics {
    pub fn new(registry: &Registry, role: &str) -> RoleMetrics {
        let m = RoleMetrics {
            messages_in: IntCounterVec::new(
                opts(
                    "pixiu_messages_in_total",
                    "Messages received, by stage",
                    role,
                ),
                &["stage"],
            )
            .expect("valid metric"),
            messages_out: IntCounterVec::new(
                opts(
                    "pixiu_messages_out_total",
                    "Messages sent on, by stage",
                    role,
                ),
                &["stage"],
            )
            .expect("valid metric"),
            dropped: IntCounterVec::new(
                opts(
                    "pixiu_messages_dropped_total",
                    "Messages refused or dropped, by stage and reason",
                    role,
                ),
                &["stage", "reason"],
            )
            .expect("valid metric"),
            queue_depth: IntGaugeVec::new(
                opts("pixiu_queue_depth", "Messages waiting in a queue", role),
                &["queue"],
            )
            .expect("valid metric"),
            connections: IntGauge::with_opts(opts(
                "pixiu_connections",
                "Open client connections",
                role,
            ))
            .expect("valid metric"),
            peers: IntGaugeVec::new(
                opts("pixiu_peers", "Peers usable right now, by kind", role),
                &["kind"],
            )
            .expect("valid metric"),
            transport: IntGaugeVec::new(
                opts(
                    "pixiu_transport",
                    "Node-to-node QUIC transport counters",
                    role,
                ),
                &["counter"],
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.messages_in.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.messages_out.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.peers.clone()),
            Box::new(m.transport.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::warn!(role, "metric registration: {e}");
            }
        }
        m
    }

    pub fn inc_in(&self, stage: &str) {
        self.messages_in.with_label_values(&[stage]).inc();
    }
    pub fn inc_out(&self, stage: &str) {
        self.messages_out.with_label_values(&[stage]).inc();
    }
    pub fn add_out(&self, stage: &str, n: u64) {
        self.messages_out.with_label_values(&[stage]).inc_by(n);
    }
    pub fn drop(&self, stage: &str, reason: &str) {
        self.dropped.with_label_values(&[stage, reason]).inc();
    }
    pub fn drop_n(&self, stage: &str, reason: &str, n: u64) {
        self.dropped.with_label_values(&[stage, reason]).inc_by(n);
    }
    pub fn set_queue(&self, queue: &str, depth: i64) {
        self.queue_depth.with_label_values(&[queue]).set(depth);
    }

    pub fn set_transport(&self, s: &pixiu_transport::TransportStats) {
        for (name, v) in [
            ("sent_datagrams", s.sent_datagrams),
            ("sent_streams", s.sent_streams),
            ("received_datagrams", s.received_datagrams),
            ("received_streams", s.received_streams),
            ("requests_in", s.requests_in),
            ("requests_out", s.requests_out),
            ("dropped_queue_full", s.dropped_queue_full),
            ("dropped_too_large", s.dropped_too_large),
            ("dropped_inbound_full", s.dropped_inbound_full),
            ("send_errors", s.send_errors),
            ("connect_failures", s.connect_failures),
            ("handshake_failures", s.handshake_failures),
            ("peers", s.peers),
            ("dropped_no_connection", s.dropped_no_connection),
            ("dropped_closed", s.dropped_closed),
            ("recv_errors", s.recv_errors),
            ("open_connections", s.open_connections),
        ] {
            self.transport.with_label_values(&[name]).set(v as i64);
        }
    }
}

/// Render a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let enc = prometheus::TextEncoder::new();
    if let Err(e) = enc.encode(&registry.gather(), &mut buf) {
        return format!("# encoding metrics failed: {e}\n");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_roles_share_a_registry() {
        let r = Registry::new();
        let a = RoleMetrics::new(&r, "gateway");
        let b = RoleMetrics::new(&r, "broker");
        a.inc_in("room");
        b.inc_in("room");
        b.drop("decode", "bad_frame");
        let text = render(&r);
        assert!(
            text.contains(r#"pixiu_messages_in_total{role="gateway",stage="room"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pixiu_messages_dropped_total{reason="bad_frame",role="broker",stage="decode"} 1"#
            ),
            "{text}"
        );
    }
}
