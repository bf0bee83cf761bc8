//! Publisher tokens already checked: a publisher sends the same token with every request,
//! and checking its HS256 signature and claims each time was about 5 % of the proxy's CPU at
//! 10,000 personal messages a second. A token that passed is remembered with its `exp` and
//! accepted again without the check until `exp + LEEWAY_SECS`, exactly as long as the check
//! itself would accept it; after that it is checked again, and refused. Only tokens that
//! passed are remembered, so a bad token costs a full check every time, as before. The
//! secret does not change while the proxy runs, so nothing else can make a remembered token
//! bad. No IO: the clock is a parameter.

use lru::LruCache;
use pixiu_protocol::auth::{self, AuthError, LEEWAY_SECS};
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};

/// Distinct good tokens remembered; publishers are few (one per backend service and key),
/// so the oldest is forgotten and checked again when it comes back.
const REMEMBERED: usize = 1024;

pub(crate) struct PublisherTokens {
    secret: Vec<u8>,
    /// Token → its `exp` (unix seconds).
    good: Mutex<LruCache<Box<str>, u64>>,
}

impl PublisherTokens {
    pub(crate) fn new(secret: Vec<u8>) -> Self {
        PublisherTokens {
            secret,
            good: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED).expect("REMEMBERED is not zero"),
            )),
        }
    }

    /// Is `token` a publisher token the check accepts at unix second `now`?
    pub(crate) fn check(&self, token: &str, now: u64) -> Result<(), AuthError> {
        {
            let mut good = self.good.lock().unwrap_or_else(PoisonError::into_inner);
            match good.get(token) {
                Some(&exp) if now <= exp.saturating_add(LEEWAY_SECS) => return Ok(()),
                Some(_) => {
                    good.pop(token);
                }
                None => {}
            }
        }
        let exp = auth::publisher_expiry(&self.secret, token)?;
        self.good
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(token.into(), exp);
        Ok(())
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.good
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a-secret-of-enough-length-0123456789";

    fn now() -> u64 {
        pixiu_protocol::now_ms() / 1000
    }

    #[test]
    fn a_good_token_is_remembered_until_the_check_would_refuse_it() {
        let tokens = PublisherTokens::new(SECRET.to_vec());
        let t = auth::issue(SECRET, 0, None, true, 60);
        let exp = now() + 60;
        assert_eq!(tokens.check(&t, now()), Ok(()));
        assert_eq!(tokens.remembered(), 1);
        // within exp + leeway: remembered, accepted
        assert_eq!(tokens.check(&t, exp + LEEWAY_SECS - 1), Ok(()));
        // past it: forgotten and checked again; the real clock is still before exp, so the
        // check passes and the token is remembered again
        assert_eq!(tokens.check(&t, exp + LEEWAY_SECS + 2), Ok(()));
        assert_eq!(tokens.remembered(), 1);
    }

    #[test]
    fn a_remembered_token_is_answered_from_memory_only_until_exp_and_leeway() {
        let tokens = PublisherTokens::new(SECRET.to_vec());
        // a token that expired long ago: the check itself refuses it
        let exp = now() - 100;
        let dead = auth::issue_until(SECRET, 0, None, true, exp);
        assert!(matches!(
            tokens.check(&dead, now()),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(tokens.remembered(), 0);
        // remembered as if it had passed while it was good
        tokens.good.lock().unwrap().put(dead.as_str().into(), exp);
        // up to exp + leeway it is answered from memory (the check would refuse it now)
        assert_eq!(tokens.check(&dead, exp), Ok(()));
        assert_eq!(tokens.check(&dead, exp + LEEWAY_SECS), Ok(()));
        // one second later it is checked again, refused, and forgotten
        assert!(matches!(
            tokens.check(&dead, exp + LEEWAY_SECS + 1),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(tokens.remembered(), 0);
    }

    #[test]
    fn bad_tokens_are_refused_and_not_remembered() {
        let tokens = PublisherTokens::new(SECRET.to_vec());
        let client = auth::issue(SECRET, 7, Some("phone"), false, 60);
        assert_eq!(tokens.check(&client, now()), Err(AuthError::NotPublisher));
        let foreign = auth::issue(b"another-secret-of-enough-length-0123", 0, None, true, 60);
        assert!(matches!(
            tokens.check(&foreign, now()),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            tokens.check("garbage", now()),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(tokens.remembered(), 0);
    }

    #[test]
    fn at_most_remembered_tokens_are_kept() {
        let tokens = PublisherTokens::new(SECRET.to_vec());
        for uid in 0..(REMEMBERED as u64 + 10) {
            let t = auth::issue(SECRET, uid, None, true, 60);
            assert_eq!(tokens.check(&t, now()), Ok(()));
        }
        assert_eq!(tokens.remembered(), REMEMBERED);
    }
}
