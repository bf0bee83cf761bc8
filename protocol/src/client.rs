//! The external contract's JSON: client WebSocket frames (client to gateway and back) and the
//! publisher HTTP bodies. Every u64 is written as a decimal string and read from a number or a
//! decimal string (JavaScript loses precision above 2^53).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A u64 that reads from a JSON number or a decimal string and writes a decimal string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub u64);

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_u64()
                .map(Id)
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a u64"))),
            Value::String(s) => s
                .parse::<u64>()
                .map(Id)
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a decimal u64"))),
            other => Err(serde::de::Error::custom(format!(
                "expected a u64 as number or decimal string, got {other}"
            ))),
        }
    }
}

/// Error codes of `{"op":"error"}` frames.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const NOT_JOINED: &str = "not_joined";
    pub const TOO_LARGE: &str = "too_large";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const UNAVAILABLE: &str = "unavailable";
}

/// A frame from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    Join {
        room: u64,
        cid: Option<String>,
    },
    Leave {
        room: u64,
        cid: Option<String>,
    },
    Publish {
        room: u64,
        body: String,
        cid: Option<String>,
        /// `"trace": true`: the delivered frames carry every hop's stamp.
        trace: bool,
    },
    Send {
        to: u64,
        body: String,
        sid: Option<u64>,
        cid: Option<String>,
        /// `"trace": true`: the delivered `inbox` frames carry every hop's stamp.
        trace: bool,
    },
    Ack {
        id: u64,
    },
    Sync {
        after: u64,
        cid: Option<String>,
    },
    Ping {
        cid: Option<String>,
    },
}

/// Why a client frame was refused; becomes an `error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub reason: String,
    pub cid: Option<String>,
}

impl FrameError {
    pub fn to_frame(&self) -> ServerFrame {
        ServerFrame::Error {
            code: self.code.to_string(),
            reason: self.reason.clone(),
            cid: self.cid.clone(),
        }
    }
}

fn field<'a, T: Deserialize<'a>>(
    obj: &'a serde_json::Map<String, Value>,
    name: &str,
    cid: &Option<String>,
) -> Result<T, FrameError> {
    let v = obj.get(name).ok_or_else(|| FrameError {
        code: codes::BAD_REQUEST,
        reason: format!("missing field {name:?}"),
        cid: cid.clone(),
    })?;
    T::deserialize(v).map_err(|e| FrameError {
        code: codes::BAD_REQUEST,
        reason: format!("field {name:?}: {e}"),
        cid: cid.clone(),
    })
}

fn body_field(
    obj: &serde_json::Map<String, Value>,
    cid: &Option<String>,
) -> Result<String, FrameError> {
    let body: String = field(obj, "body", cid)?;
    if body.len() > crate::MAX_BODY {
        return Err(FrameError {
            code: codes::TOO_LARGE,
            reason: format!(
                "body is {} bytes, the limit is {}",
                body.len(),
                crate::MAX_BODY
            ),
            cid: cid.clone(),
        });
    }
    Ok(body)
}

/// Parse one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientRequest, FrameError> {
    let bad = |reason: String, cid: Option<String>| FrameError {
        code: codes::BAD_REQUEST,
        reason,
        cid,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}"), None))?;
    let Value::Object(obj) = value else {
        return Err(bad("a frame must be a JSON object".into(), None));
    };
    let cid = match obj.get("cid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 128 => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(bad(
                "cid must be a string of at most 128 bytes".into(),
                None,
            ))
        }
    };
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        _ => return Err(bad("missing string field \"op\"".into(), cid)),
    };
    let opt_id = |name: &str| -> Result<Option<u64>, FrameError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => field::<Id>(&obj, name, &cid).map(|i| Some(i.0)),
        }
    };
    Ok(match op {
        "join" => ClientRequest::Join {
            room: field::<Id>(&obj, "room", &cid)?.0,
            cid,
        },
        "leave" => ClientRequest::Leave {
            room: field::<Id>(&obj, "room", &cid)?.0,
            cid,
        },
        "publish" => ClientRequest::Publish {
            room: field::<Id>(&obj, "room", &cid)?.0,
            body: body_field(&obj, &cid)?,
            trace: obj.get("trace").and_then(Value::as_bool).unwrap_or(false),
            cid,
        },
        "send" => ClientRequest::Send {
            to: field::<Id>(&obj, "to", &cid)?.0,
            body: body_field(&obj, &cid)?,
            sid: opt_id("sid")?,
            trace: obj.get("trace").and_then(Value::as_bool).unwrap_or(false),
            cid,
        },
        "ack" => ClientRequest::Ack {
            id: field::<Id>(&obj, "id", &cid)?.0,
        },
        "sync" => ClientRequest::Sync {
            after: opt_id("after")?.unwrap_or(0),
            cid,
        },
        "ping" => ClientRequest::Ping { cid },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(bad(format!("unknown op {shown:?}"), cid));
        }
    })
}

/// A frame from the gateway to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame {
    Joined {
        room: Id,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
    Left {
        room: Id,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
    Published {
        room: Id,
        id: Id,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
    Sent {
        id: Id,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
    Room {
        room: Id,
        id: Id,
        from: Id,
        body: String,
        ts: u64,
        /// The hops of a message published with `"trace": true` (absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<Vec<crate::trace::HopJson>>,
    },
    Inbox {
        id: Id,
        from: Id,
        body: String,
        ts: u64,
        /// The hops of a message sent with `"trace": true` (absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<Vec<crate::trace::HopJson>>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
    Error {
        code: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
    },
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

/// Body of `POST /v1/rooms/{room}/messages` and `POST /v1/users/{uid}/messages`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PublishBody {
    pub body: String,
    #[serde(default)]
    pub from: Option<Id>,
    #[serde(default)]
    pub sid: Option<Id>,
    /// Collect every hop's stamp into the delivered frames.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trace: bool,
}

/// Body of `POST /v1/users/messages`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MulticastBody {
    pub to: Vec<Id>,
    pub body: String,
    #[serde(default)]
    pub from: Option<Id>,
    #[serde(default)]
    pub sid: Option<Id>,
    /// Collect every hop's stamp into the delivered frames.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trace: bool,
}

/// Most messages in one `POST /v1/users/messages/batch`.
pub const MAX_BATCH: usize = 1000;

/// One message of `POST /v1/users/messages/batch`: a personal message to `to`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BatchItem {
    pub to: Id,
    pub body: String,
    #[serde(default)]
    pub from: Option<Id>,
    #[serde(default)]
    pub sid: Option<Id>,
    /// Collect every hop's stamp into the delivered frames.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trace: bool,
}

/// Body of `POST /v1/users/messages/batch`: `{"messages":[..]}`, 1 to [`MAX_BATCH`].
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BatchBody {
    pub messages: Vec<BatchItem>,
}

/// What became of one message of a batch: its id once acknowledged, else why not.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum BatchResult {
    Stored {
        id: Id,
    },
    /// `sid` is the message's (the one given, or the one the proxy minted): sending the
    /// message again with it stores it at most once.
    Failed {
        error: String,
        reason: String,
        sid: Id,
    },
}

/// Answer of `POST /v1/users/messages/batch`: one result per message, in the request's order.
/// `error` and `reason` are there when not every message was acknowledged (HTTP 503).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BatchReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub results: Vec<BatchResult>,
}

/// `{"id":".."}`
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct IdReply {
    pub id: Id,
}

/// `{"error":"<code>","reason":".."}`
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ErrorReply {
    pub error: String,
    pub reason: String,
}

/// `{"gateways":[..]}`
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct GatewaysReply {
    pub gateways: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        assert_eq!(
            parse_client_frame(r#"{"op":"join","room":"42","cid":"1"}"#).unwrap(),
            ClientRequest::Join {
                room: 42,
                cid: Some("1".into())
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"leave","room":42}"#).unwrap(),
            ClientRequest::Leave {
                room: 42,
                cid: None
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"publish","room":"18446744073709551615","body":"hi"}"#)
                .unwrap(),
            ClientRequest::Publish {
                room: u64::MAX,
                body: "hi".into(),
                cid: None,
                trace: false,
            }
        );
        assert!(matches!(
            parse_client_frame(r#"{"op":"send","to":"7","body":"x","sid":"9"}"#).unwrap(),
            ClientRequest::Send {
                to: 7,
                sid: Some(9),
                ..
            }
        ));
        assert_eq!(
            parse_client_frame(r#"{"op":"ack","id":"5"}"#).unwrap(),
            ClientRequest::Ack { id: 5 }
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"sync","after":"0"}"#).unwrap(),
            ClientRequest::Sync {
                after: 0,
                cid: None
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"ping"}"#).unwrap(),
            ClientRequest::Ping { cid: None }
        );
    }

    #[test]
    fn refuses_bad_frames_with_reason() {
        for (text, code) in [
            ("not json", codes::BAD_REQUEST),
            ("[1,2]", codes::BAD_REQUEST),
            (r#"{"room":"1"}"#, codes::BAD_REQUEST),
            (r#"{"op":"dance"}"#, codes::BAD_REQUEST),
            (r#"{"op":"join"}"#, codes::BAD_REQUEST),
            (r#"{"op":"join","room":"-1"}"#, codes::BAD_REQUEST),
            (r#"{"op":"join","room":1.5}"#, codes::BAD_REQUEST),
            (
                r#"{"op":"join","room":"18446744073709551616"}"#,
                codes::BAD_REQUEST,
            ),
            (
                r#"{"op":"publish","room":"1","body":7}"#,
                codes::BAD_REQUEST,
            ),
        ] {
            let e = parse_client_frame(text).unwrap_err();
            assert_eq!(e.code, code, "{text}");
            assert!(!e.reason.is_empty());
        }
        let big = format!(
            r#"{{"op":"publish","room":"1","body":"{}","cid":"c"}}"#,
            "x".repeat(crate::MAX_BODY + 1)
        );
        let e = parse_client_frame(&big).unwrap_err();
        assert_eq!(e.code, codes::TOO_LARGE);
        assert_eq!(e.cid.as_deref(), Some("c"));
        let e = parse_client_frame(r#"{"op":"dance","cid":"z"}"#).unwrap_err();
        assert_eq!(e.cid.as_deref(), Some("z"));
    }

    #[test]
    fn server_frames_use_decimal_strings() {
        let f = ServerFrame::Room {
            room: Id(42),
            id: Id(u64::MAX),
            from: Id(7),
            body: "hi".into(),
            ts: 1,
            trace: None,
        };
        let s = f.to_json();
        assert_eq!(
            s,
            r#"{"op":"room","room":"42","id":"18446744073709551615","from":"7","body":"hi","ts":1}"#
        );
        let back: ServerFrame = serde_json::from_str(&s).unwrap();
        assert_eq!(back, f);
        assert_eq!(
            ServerFrame::Pong { cid: None }.to_json(),
            r#"{"op":"pong"}"#
        );
    }
}
