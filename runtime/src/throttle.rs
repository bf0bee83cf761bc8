//! Warnings that an outage cannot turn into a flood of lines: a [`Throttle`] lets one line
//! through per interval and counts the ones it held back, for the next line to say. (When a
//! Xiu follower dies, every personal message is refused until it is back: at 10,000 a second
//! one line each would bury everything else in the log.)

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    /// When a line last went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether to write the line now: `Some(n)`, with the `n` lines held back since the last
    /// one, or `None` (this one is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_those_held_back() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        for ms in [1, 500, 999] {
            assert_eq!(t.allow_at(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.allow_at(t0 + Duration::from_millis(1000)), Some(3));
        assert_eq!(t.allow_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_millis(5000)), Some(1));
        assert_eq!(t.allow_at(t0 + Duration::from_millis(6000)), Some(0));
    }
}
