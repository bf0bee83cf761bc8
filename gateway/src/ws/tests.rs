//! Who may connect: tokens, insecure dev mode, and the 401 reasons clients are told.

use super::*;
use axum::http::HeaderValue;

const SECRET: &[u8] = b"a test secret";

fn settings(secret: Option<&[u8]>, insecure_dev_auth: bool) -> WsSettings {
    WsSettings {
        secret: secret.map(<[u8]>::to_vec),
        insecure_dev_auth,
        idle_timeout: Duration::from_secs(60),
        client_queue: 8,
        publish_rate: 10,
        publish_burst: 10,
        hop: pixiu_runtime::Hop::fixed("gateway", 1, None, "127.0.0.1:7"),
    }
}

fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    h.insert(AUTHORIZATION, value);
    h
}

fn who(uid: u64, device: &str) -> Identity {
    Identity {
        uid,
        device: device.into(),
    }
}

#[test]
fn a_token_in_the_header_or_the_query() {
    let s = settings(Some(SECRET), false);
    let token = auth::issue(SECRET, 42, Some("phone"), false, 60);
    let header = authenticate(&s, &bearer(&token), &HashMap::new());
    assert_eq!(header.unwrap(), who(42, "phone"));
    let q = query(&[("token", &token)]);
    assert_eq!(
        authenticate(&s, &HeaderMap::new(), &q).unwrap(),
        who(42, "phone")
    );
    // without a device claim: the default device
    let token = auth::issue(SECRET, 7, None, false, 60);
    let q = query(&[("token", &token)]);
    let id = authenticate(&s, &HeaderMap::new(), &q).unwrap();
    assert_eq!(id, who(7, auth::DEFAULT_DEVICE));
}

#[test]
fn the_header_wins_over_the_query() {
    let s = settings(Some(SECRET), false);
    let good = auth::issue(SECRET, 42, None, false, 60);
    let q = query(&[("token", "not a token")]);
    assert_eq!(authenticate(&s, &bearer(&good), &q).unwrap().uid, 42);
}

#[test]
fn a_token_without_a_secret() {
    let s = settings(None, true);
    let q = query(&[("token", "anything"), ("uid", "5")]);
    let e = authenticate(&s, &HeaderMap::new(), &q).unwrap_err();
    assert_eq!(e, AuthError::NoSecret);
    assert_eq!(
        e.to_string(),
        "this gateway has no auth secret; tokens cannot be checked"
    );
}

#[test]
fn a_bad_token_says_what_the_auth_crate_says() {
    let s = settings(Some(SECRET), false);
    let forged = auth::issue(b"another secret", 42, None, false, 60);
    for token in [forged.as_str(), "garbage"] {
        let e = authenticate(&s, &bearer(token), &HashMap::new()).unwrap_err();
        let inner = auth::verify_client(SECRET, token).unwrap_err();
        assert!(matches!(
            &e,
            AuthError::BadToken(auth::AuthError::Invalid(_))
        ));
        assert_eq!(e.to_string(), inner.to_string());
        assert!(e.to_string().starts_with("invalid token: "), "{e}");
    }
    // an empty bearer token is the auth crate's "missing token"
    let e = authenticate(&s, &bearer(""), &HashMap::new()).unwrap_err();
    assert_eq!(e, AuthError::BadToken(auth::AuthError::Missing));
    assert_eq!(e.to_string(), "missing token");
}

#[test]
fn no_token_outside_dev_mode() {
    let s = settings(Some(SECRET), false);
    let q = query(&[("uid", "5")]);
    let e = authenticate(&s, &HeaderMap::new(), &q).unwrap_err();
    assert_eq!(e, AuthError::MissingToken);
    assert_eq!(e.to_string(), "missing token");
}

#[test]
fn dev_mode_identity() {
    let s = settings(None, true);
    let q = query(&[("uid", "5"), ("dev", "laptop-1")]);
    assert_eq!(
        authenticate(&s, &HeaderMap::new(), &q).unwrap(),
        who(5, "laptop-1")
    );
    let q = query(&[("uid", "18446744073709551615")]);
    let id = authenticate(&s, &HeaderMap::new(), &q).unwrap();
    assert_eq!(id, who(u64::MAX, auth::DEFAULT_DEVICE));
}

#[test]
fn dev_mode_refusals() {
    let s = settings(None, true);
    let no_headers = HeaderMap::new();
    let e = authenticate(&s, &no_headers, &query(&[("dev", "x")])).unwrap_err();
    assert_eq!(e, AuthError::MissingUid);
    assert_eq!(
        e.to_string(),
        "missing token (or ?uid= in insecure dev mode)"
    );

    for uid in ["abc", "-1", "", "18446744073709551616"] {
        let e = authenticate(&s, &no_headers, &query(&[("uid", uid)])).unwrap_err();
        assert!(matches!(e, AuthError::BadUid(_)), "{uid}: {e:?}");
        assert_eq!(e.to_string(), "uid must be a decimal u64");
    }

    let long = "d".repeat(65);
    for dev in ["", "a b", "ü", long.as_str()] {
        let q = query(&[("uid", "5"), ("dev", dev)]);
        let e = authenticate(&s, &no_headers, &q).unwrap_err();
        assert_eq!(e, AuthError::BadDevice(dev.into()));
        let text = format!("device {dev:?} must be 1..=64 bytes of [A-Za-z0-9_.-]");
        assert_eq!(e.to_string(), text);
    }
}

#[tokio::test]
async fn the_401_body() {
    let r = unauthorized(&AuthError::MissingUid);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let want = serde_json::json!({
        "error": "unauthorized",
        "reason": "missing token (or ?uid= in insecure dev mode)",
    });
    assert_eq!(body, want);
}
