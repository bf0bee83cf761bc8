//! What a connection's requests get, decided without a socket: joins, publishes before and
//! after joining, the rate limit shared by `publish` and `send`, and the answers' frames.

use super::*;
use std::time::Duration;

const ROOM: u64 = 4;

fn cid(s: &str) -> Option<String> {
    Some(s.into())
}

fn session(rate: u32, burst: u32, now: Instant) -> Session {
    let who = Identity {
        uid: 42,
        device: "phone".into(),
    };
    Session::new(1, who, rate, burst, now)
}

fn joined(room: u64, c: &str) -> ServerFrame {
    ServerFrame::Joined {
        room: Id(room),
        cid: cid(c),
    }
}

/// A session in `ROOM`, with an unlimited rate.
fn in_room(now: Instant) -> Session {
    let mut s = session(0, 0, now);
    assert_eq!(s.join(ROOM, cid("j")), JoinStart::Ask(cid("j")));
    assert_eq!(s.join_answered(ROOM, cid("j"), Ok(())), joined(ROOM, "j"));
    s
}

#[test]
fn a_join_asks_the_core_once() {
    let mut s = session(0, 0, Instant::now());
    assert_eq!(s.join(ROOM, cid("a")), JoinStart::Ask(cid("a")));
    // a second join of the same room while the first is under way is refused
    let under_way = error(
        codes::BAD_REQUEST,
        "a join of this room is already under way".into(),
        cid("b"),
    );
    assert_eq!(s.join(ROOM, cid("b")), JoinStart::Answer(under_way));
    // another room is not
    assert_eq!(s.join(ROOM + 1, None), JoinStart::Ask(None));
    assert_eq!(s.join_answered(ROOM, cid("a"), Ok(())), joined(ROOM, "a"));
    // joined: answered at once
    assert_eq!(s.join(ROOM, cid("c")), JoinStart::Answer(joined(ROOM, "c")));
}

#[test]
fn a_failed_join_may_be_tried_again() {
    let mut s = session(0, 0, Instant::now());
    let now = Instant::now();
    for e in [JoinError::Timeout, JoinError::Left, JoinError::ShuttingDown] {
        assert_eq!(s.join(ROOM, cid("a")), JoinStart::Ask(cid("a")));
        let frame = s.join_answered(ROOM, cid("a"), Err(e));
        assert_eq!(frame, error(codes::UNAVAILABLE, e.to_string(), cid("a")));
        let refused = s.admit_publish(ROOM, &None, now).unwrap_err();
        assert_eq!(refused.reason, "not_joined");
    }
    assert_eq!(
        JoinError::ShuttingDown.to_string(),
        "gateway is shutting down"
    );
}

#[test]
fn publish_before_join_is_refused() {
    let now = Instant::now();
    let mut s = session(0, 0, now);
    let refused = s.admit_publish(ROOM, &cid("p"), now).unwrap_err();
    let frame = error(
        codes::NOT_JOINED,
        "join room 4 before publishing to it".into(),
        cid("p"),
    );
    let want = Refusal {
        stage: "publish",
        reason: "not_joined",
        frame,
    };
    assert_eq!(refused, want);
    // still refused while the join is under way
    assert_eq!(s.join(ROOM, None), JoinStart::Ask(None));
    assert!(s.admit_publish(ROOM, &None, now).is_err());
    s.join_answered(ROOM, None, Ok(()));
    assert_eq!(s.admit_publish(ROOM, &None, now), Ok(()));
}

#[test]
fn leave_ends_publishing_but_not_a_join_under_way() {
    let now = Instant::now();
    let mut s = in_room(now);
    assert_eq!(s.join(ROOM + 1, None), JoinStart::Ask(None));
    s.leave(ROOM);
    assert!(s.admit_publish(ROOM, &None, now).is_err());
    // a leave does not cancel a join under way: the core answers it (with an error), and a
    // connection ending meanwhile leaves it too
    s.leave(ROOM + 1);
    assert_eq!(s.into_rooms().collect::<Vec<_>>(), vec![ROOM + 1]);
}

#[test]
fn the_rooms_left_at_the_end() {
    let now = Instant::now();
    let mut s = in_room(now);
    assert_eq!(s.join(ROOM + 1, None), JoinStart::Ask(None));
    let mut rooms: Vec<u64> = s.into_rooms().collect();
    rooms.sort_unstable();
    assert_eq!(rooms, vec![ROOM, ROOM + 1]);
}

#[test]
fn publish_and_send_share_the_rate_limit() {
    let t0 = Instant::now();
    let mut s = session(2, 3, t0);
    s.joined.insert(ROOM);
    assert_eq!(s.admit_publish(ROOM, &None, t0), Ok(()));
    assert_eq!(s.admit_send(&None, t0), Ok(()));
    // a publish to a room not joined still takes a token
    assert!(s.admit_publish(ROOM + 1, &None, t0).is_err());
    let limited = Refusal {
        stage: "publish",
        reason: "rate_limited",
        frame: error(
            codes::RATE_LIMITED,
            "more than 2 publishes a second".into(),
            cid("p"),
        ),
    };
    assert_eq!(s.admit_publish(ROOM, &cid("p"), t0), Err(limited));
    let limited = Refusal {
        stage: "send",
        reason: "rate_limited",
        frame: error(
            codes::RATE_LIMITED,
            "more than 2 sends and publishes a second".into(),
            cid("s"),
        ),
    };
    assert_eq!(s.admit_send(&cid("s"), t0), Err(limited));
    // the rate limit comes first: not joined and out of tokens is rate_limited
    let refused = s.admit_publish(ROOM + 1, &None, t0).unwrap_err();
    assert_eq!(refused.reason, "rate_limited");
    let later = t0 + Duration::from_millis(500);
    assert_eq!(s.admit_send(&None, later), Ok(()));
    assert!(s.admit_send(&None, later).is_err());
}

#[test]
fn rate_zero_is_unlimited() {
    let now = Instant::now();
    let mut s = in_room(now);
    assert!((0..10_000).all(|_| s.admit_publish(ROOM, &None, now).is_ok()));
    assert!((0..10_000).all(|_| s.admit_send(&None, now).is_ok()));
}

#[test]
fn the_answer_to_a_send() {
    assert_eq!(
        sent(cid("s"), Ok(9)),
        ServerFrame::Sent {
            id: Id(9),
            cid: cid("s")
        }
    );
    let bad = sent(None, Err(CourierError::BadRequest("no receivers".into())));
    assert_eq!(bad, error(codes::BAD_REQUEST, "no receivers".into(), None));
    let late = sent(cid("s"), Err(CourierError::Unavailable("late".into())));
    assert_eq!(late, error(codes::UNAVAILABLE, "late".into(), cid("s")));
}
