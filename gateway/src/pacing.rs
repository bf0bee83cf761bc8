//! When the core fans out staged room messages (no IO: the core passes the clock in).
//!
//! One fan-out at most per `interval`: a message that finds the last fan-out at least
//! `interval` ago goes at once; one that comes sooner waits until `interval` after the last
//! fan-out and goes with everything staged meanwhile, as one batch per member. So a quiet room's
//! message is never held, a busy gateway writes to each member at most once per `interval`
//! whatever the message rate, and no message waits longer than `interval` (or not at all once
//! `max_staged` messages are waiting).

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    max_staged: usize,
    /// The last fan-out; `None` before the first.
    last: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(interval: Duration, max_staged: usize) -> Pacer {
        Pacer {
            interval,
            max_staged,
            last: None,
        }
    }

    /// With `staged` messages waiting at `now` (some just arrived): fan out now?
    pub(crate) fn due(&self, now: Instant, staged: usize) -> bool {
        staged > 0
            && (staged >= self.max_staged
                || self.last.is_none_or(|last| now >= last + self.interval))
    }

    /// When what is staged and not [`Pacer::due`] goes: `interval` after the last fan-out.
    pub(crate) fn deadline(&self, now: Instant) -> Instant {
        self.last.map_or(now, |last| last + self.interval)
    }

    /// A fan-out happened at `now`.
    pub(crate) fn fanned_out(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacer() -> Pacer {
        Pacer::new(10 * MS, 100)
    }

    #[test]
    fn a_message_in_a_quiet_gateway_goes_at_once() {
        let (p, t0) = (pacer(), Instant::now());
        assert!(p.due(t0, 1), "the first message ever");
        let mut p = p;
        p.fanned_out(t0);
        assert!(p.due(t0 + 10 * MS, 1), "exactly one interval later");
        assert!(p.due(t0 + 500 * MS, 1), "long after");
        assert!(!p.due(t0 + 500 * MS, 0), "nothing staged, nothing to do");
    }

    #[test]
    fn messages_within_the_interval_wait_and_go_together() {
        let (mut p, t0) = (pacer(), Instant::now());
        p.fanned_out(t0);
        // two messages arrive 2 and 7 ms later: neither goes on arrival
        assert!(!p.due(t0 + 2 * MS, 1));
        assert!(!p.due(t0 + 7 * MS, 2));
        // both at the deadline, one interval after the last fan-out, as one batch of 2
        assert_eq!(p.deadline(t0 + 7 * MS), t0 + 10 * MS);
        assert!(p.due(t0 + 10 * MS, 2));
        p.fanned_out(t0 + 10 * MS);
        // and the next one waits for the following interval
        assert!(!p.due(t0 + 11 * MS, 1));
        assert_eq!(p.deadline(t0 + 11 * MS), t0 + 20 * MS);
    }

    #[test]
    fn no_message_waits_longer_than_the_interval() {
        let (mut p, t0) = (pacer(), Instant::now());
        p.fanned_out(t0);
        for k in 0..10u32 {
            let arrived = t0 + k * MS;
            let goes = if p.due(arrived, 1) {
                arrived
            } else {
                p.deadline(arrived)
            };
            assert!(
                goes >= arrived && goes - arrived <= 10 * MS,
                "arrived at +{k} ms"
            );
        }
    }

    #[test]
    fn too_much_staged_goes_without_waiting() {
        let (mut p, t0) = (pacer(), Instant::now());
        p.fanned_out(t0);
        assert!(!p.due(t0 + MS, 99));
        assert!(p.due(t0 + MS, 100));
    }

    #[test]
    fn a_zero_interval_never_holds_a_message() {
        let (mut p, t0) = (Pacer::new(Duration::ZERO, 100), Instant::now());
        p.fanned_out(t0);
        assert!(p.due(t0, 1));
        assert_eq!(p.deadline(t0), t0);
    }
}
