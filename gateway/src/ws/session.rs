//! One client connection's bookkeeping, without IO: who it is, which rooms it is in or is
//! joining, and its publish budget. It decides what a request or an answer gets (a frame to
//! send now, a refusal with the metric to count, or "ask the cluster"); `conn.rs` does the IO.

use crate::rate::TokenBucket;
use crate::rooms::{ConnId, JoinError};
use pixiu_courier::CourierError;
use pixiu_protocol::auth::Identity;
use pixiu_protocol::client::{codes, Id, ServerFrame};
use std::collections::HashSet;
use std::time::Instant;

pub(super) struct Session {
    pub conn: ConnId,
    pub who: Identity,
    /// rooms whose join was answered with `joined`
    joined: HashSet<u64>,
    /// rooms whose join waits for the cluster
    joining: HashSet<u64>,
    /// shared by `publish` and `send`
    bucket: TokenBucket,
    /// the bucket's rate, for the refusal's text
    rate: u32,
}

/// A request refused before it leaves the connection: the dropped-metric labels to count and
/// the frame the client gets.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    pub stage: &'static str,
    pub reason: &'static str,
    pub frame: ServerFrame,
}

/// What a `join` gets.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum JoinStart {
    /// This frame, now (already joined, or a join of the room is under way).
    Answer(ServerFrame),
    /// Ask the core; the answer comes later with this `cid`.
    Ask(Option<String>),
}

/// An `error` frame.
pub(super) fn error(code: &str, reason: String, cid: Option<String>) -> ServerFrame {
    ServerFrame::Error {
        code: code.into(),
        reason,
        cid,
    }
}

impl Session {
    /// `rate` `send`s and `publish`es a second (0: unlimited), at most `burst` saved up.
    pub(super) fn new(conn: ConnId, who: Identity, rate: u32, burst: u32, now: Instant) -> Self {
        Session {
            conn,
            who,
            joined: HashSet::new(),
            joining: HashSet::new(),
            bucket: TokenBucket::new(rate, burst, now),
            rate,
        }
    }

    pub(super) fn join(&mut self, room: u64, cid: Option<String>) -> JoinStart {
        if self.joined.contains(&room) {
            JoinStart::Answer(ServerFrame::Joined {
                room: Id(room),
                cid,
            })
        } else if !self.joining.insert(room) {
            let reason = "a join of this room is already under way".into();
            JoinStart::Answer(error(codes::BAD_REQUEST, reason, cid))
        } else {
            JoinStart::Ask(cid)
        }
    }

    /// The core answered the join of `room`.
    pub(super) fn join_answered(
        &mut self,
        room: u64,
        cid: Option<String>,
        result: Result<(), JoinError>,
    ) -> ServerFrame {
        self.joining.remove(&room);
        match result {
            Ok(()) => {
                self.joined.insert(room);
                ServerFrame::Joined {
                    room: Id(room),
                    cid,
                }
            }
            Err(e) => error(codes::UNAVAILABLE, e.to_string(), cid),
        }
    }

    /// A `leave`: a join under way stays until the core answers it (with an error).
    pub(super) fn leave(&mut self, room: u64) {
        self.joined.remove(&room);
    }

    /// May this `publish` go on? It takes a token even when refused for not being joined.
    pub(super) fn admit_publish(
        &mut self,
        room: u64,
        cid: &Option<String>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if !self.bucket.take(now) {
            let reason = format!("more than {} publishes a second", self.rate);
            return Err(rate_limited("publish", reason, cid));
        }
        if !self.joined.contains(&room) {
            return Err(Refusal {
                stage: "publish",
                reason: "not_joined",
                frame: error(
                    codes::NOT_JOINED,
                    format!("join room {room} before publishing to it"),
                    cid.clone(),
                ),
            });
        }
        Ok(())
    }

    /// May this `send` go on?
    pub(super) fn admit_send(&mut self, cid: &Option<String>, now: Instant) -> Result<(), Refusal> {
        if self.bucket.take(now) {
            return Ok(());
        }
        let reason = format!("more than {} sends and publishes a second", self.rate);
        Err(rate_limited("send", reason, cid))
    }

    /// Every room this connection is in or joining, to leave when it ends.
    pub(super) fn into_rooms(self) -> impl Iterator<Item = u64> {
        self.joined.into_iter().chain(self.joining)
    }
}

fn rate_limited(stage: &'static str, reason: String, cid: &Option<String>) -> Refusal {
    Refusal {
        stage,
        reason: "rate_limited",
        frame: error(codes::RATE_LIMITED, reason, cid.clone()),
    }
}

/// The answer to a `send` once the courier is done with it.
pub(super) fn sent(cid: Option<String>, result: Result<u64, CourierError>) -> ServerFrame {
    match result {
        Ok(id) => ServerFrame::Sent { id: Id(id), cid },
        Err(CourierError::BadRequest(reason)) => error(codes::BAD_REQUEST, reason, cid),
        Err(CourierError::Unavailable(reason)) => error(codes::UNAVAILABLE, reason, cid),
    }
}

#[cfg(test)]
mod tests;
