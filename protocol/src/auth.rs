//! Tokens: JWTs signed HS256 with the cluster's auth secret. Claims `sub` (uid as a decimal
//! string), `dev` (device, default `"default"`), `exp` (unix seconds) and, for publishers,
//! `role: "publisher"`.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const DEFAULT_DEVICE: &str = "default";

/// Seconds a token is still accepted after its `exp`, for clocks that differ a little.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Who a client connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u64,
    pub device: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject {0:?} is not a decimal uid")]
    BadSubject(String),
    #[error("device {0:?} must be 1..=64 bytes of [A-Za-z0-9_.-]")]
    BadDevice(String),
    #[error("token is not a publisher token")]
    NotPublisher,
}

/// Is `dev` a valid device name (1..=64 bytes of `[A-Za-z0-9_.-]`)?
pub fn valid_device(dev: &str) -> bool {
    !dev.is_empty()
        && dev.len() <= 64
        && dev
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Issue a token valid for `ttl_secs` from now.
pub fn issue(
    secret: &[u8],
    uid: u64,
    device: Option<&str>,
    publisher: bool,
    ttl_secs: u64,
) -> String {
    issue_until(
        secret,
        uid,
        device,
        publisher,
        crate::now_ms() / 1000 + ttl_secs,
    )
}

/// Issue a token whose `exp` is `exp` (unix seconds), which may be in the past.
pub fn issue_until(
    secret: &[u8],
    uid: u64,
    device: Option<&str>,
    publisher: bool,
    exp: u64,
) -> String {
    let claims = Claims {
        sub: uid.to_string(),
        dev: device.map(str::to_string),
        exp,
        role: publisher.then(|| "publisher".to_string()),
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

fn claims(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = LEEWAY_SECS;
    v.set_required_spec_claims(&["exp", "sub"]);
    decode::<Claims>(token, &DecodingKey::from_secret(secret), &v)
        .map(|d| d.claims)
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// Check a client token and say who it is.
pub fn verify_client(secret: &[u8], token: &str) -> Result<Identity, AuthError> {
    let c = claims(secret, token)?;
    let uid = c
        .sub
        .parse::<u64>()
        .map_err(|_| AuthError::BadSubject(c.sub.clone()))?;
    let device = c.dev.unwrap_or_else(|| DEFAULT_DEVICE.to_string());
    if !valid_device(&device) {
        return Err(AuthError::BadDevice(device));
    }
    Ok(Identity { uid, device })
}

/// Check a publisher token (claim `role: "publisher"`).
pub fn verify_publisher(secret: &[u8], token: &str) -> Result<(), AuthError> {
    publisher_expiry(secret, token).map(|_| ())
}

/// Check a publisher token and say when it expires (its `exp`, unix seconds): a caller that
/// remembers good tokens must refuse this one once `exp + LEEWAY_SECS` has passed.
pub fn publisher_expiry(secret: &[u8], token: &str) -> Result<u64, AuthError> {
    let c = claims(secret, token)?;
    if c.role.as_deref() == Some("publisher") {
        Ok(c.exp)
    } else {
        Err(AuthError::NotPublisher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_failures() {
        let s = b"secret";
        let t = issue(s, 42, Some("phone"), false, 60);
        assert_eq!(
            verify_client(s, &t).unwrap(),
            Identity {
                uid: 42,
                device: "phone".into()
            }
        );
        assert!(matches!(
            verify_client(b"other", &t),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(verify_publisher(s, &t), Err(AuthError::NotPublisher));
        let p = issue(s, 0, None, true, 60);
        assert!(verify_publisher(s, &p).is_ok());
        assert_eq!(verify_client(s, &p).unwrap().device, "default");
        assert!(matches!(
            verify_client(s, "garbage"),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(verify_client(s, ""), Err(AuthError::Missing));
        // expired
        let claims = Claims {
            sub: "1".into(),
            dev: None,
            exp: 1000,
            role: None,
        };
        let old = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(s),
        )
        .unwrap();
        assert!(matches!(verify_client(s, &old), Err(AuthError::Invalid(_))));
        // bad device
        let t = issue(s, 1, Some("bad device!"), false, 60);
        assert!(matches!(verify_client(s, &t), Err(AuthError::BadDevice(_))));
    }
}
