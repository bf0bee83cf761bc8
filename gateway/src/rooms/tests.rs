//! The room state machine's rules, with a made-up cluster and clock.

use super::*;
use pixiu_registry::{Member, NodeInfo, NodeState};

const ROOM: u64 = 4;
const ME: u64 = 7;

fn gw() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn member(id: u64, port: u16, state: NodeState) -> Member {
    let mut info = NodeInfo::new(addr(port).to_string());
    info.state = state;
    Member {
        id,
        name: format!("node-{id:010}"),
        info,
    }
}

fn view(partitions: Vec<Vec<Member>>) -> Arc<RoleView> {
    Arc::new(RoleView {
        partition_num: partitions.len() as u32,
        partitions: (0u32..).zip(partitions).collect(),
    })
}

/// One router (port 6000); broker partition 0 with running replicas 10 and 11, partition 1
/// with replica 20. Room 4 is served by broker partition 0.
fn cluster() -> Cluster {
    let run = NodeState::Running;
    Cluster {
        routers: view(vec![vec![member(1, 6000, run)]]),
        brokers: view(vec![
            vec![member(10, 7000, run), member(11, 7001, run)],
            vec![member(20, 7100, run)],
        ]),
        router_live: Liveness::new(Duration::from_secs(1)),
    }
}

fn rooms() -> Rooms<u64> {
    let s = RoomsSettings {
        big_rooms: BigRooms::parse("1000..2000").unwrap(),
        join_timeout: Duration::from_secs(3),
        dedup_capacity: 16,
    };
    Rooms::new(s, ME, gw())
}

fn seat(conn: ConnId, uid: u64, room: u64) -> Seat {
    Seat { conn, uid, room }
}

/// (key, present, twice, why) of each announcement.
fn announced(out: &[Action]) -> Vec<(RouteKey, bool, bool, Why)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Announce {
                update, twice, why, ..
            } => Some((update.key, update.present, *twice, *why)),
            Action::AnswerJoin { .. } => None,
        })
        .collect()
}

/// The ids of the announcements.
fn ids(out: &[Action]) -> Vec<GatewayMsgId> {
    out.iter()
        .filter_map(|a| match a {
            Action::Announce { update, .. } => Some(update.id),
            Action::AnswerJoin { .. } => None,
        })
        .collect()
}

fn answers(out: &[Action]) -> Vec<(JoinId, Result<(), JoinError>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::AnswerJoin { join, result } => Some((*join, *result)),
            Action::Announce { .. } => None,
        })
        .collect()
}

fn key() -> RouteKey {
    RouteKey::room(ROOM)
}

/// Joins conns 1 and 2 (users 101, 102) to `ROOM` as joins 1 and 2; the first announcement's id.
fn two_waiting(r: &mut Rooms<u64>, c: &Cluster, t: Instant) -> GatewayMsgId {
    let mut out = Vec::new();
    r.join(t, c, seat(1, 101, ROOM), 1, 1, &mut out);
    r.join(t, c, seat(2, 102, ROOM), 2, 2, &mut out);
    ids(&out)[0]
}

#[test]
fn the_first_member_announces_twice_and_later_ones_wait_with_it() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 101, ROOM), 1, 1, &mut out);
    assert_eq!(announced(&out), vec![(key(), true, true, Why::Join)]);
    let Action::Announce { update, to, .. } = &out[0] else {
        panic!("an announcement");
    };
    assert_eq!(to, &vec![addr(6000)]);
    assert_eq!(
        update.gateway,
        GatewayRef {
            instance: ME,
            addr: gw()
        }
    );
    assert!(!update.forwarded);
    assert!(answers(&out).is_empty(), "waits for the brokers");
    out.clear();
    r.join(t, &c, seat(2, 102, ROOM), 2, 2, &mut out);
    assert!(
        out.is_empty(),
        "a second member neither announces nor is answered yet"
    );
    // the same connection joining again is answered at once
    r.join(t, &c, seat(1, 101, ROOM), 1, 3, &mut out);
    assert_eq!(answers(&out), vec![(3, Ok(()))]);
    assert!(announced(&out).is_empty());
}

#[test]
fn a_join_is_answered_once_every_running_replica_serving_the_key_acked() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let id = two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.applied(&c, id, key(), 0, 10, &mut out);
    r.applied(&c, id, key(), 0, 10, &mut out);
    assert!(out.is_empty(), "replica 11 has not acked yet");
    r.applied(&c, id, key(), 0, 11, &mut out);
    assert_eq!(answers(&out), vec![(1, Ok(())), (2, Ok(()))]);
    out.clear();
    // confirmed: later members are answered at once, without announcing
    r.join(t, &c, seat(3, 103, ROOM), 3, 3, &mut out);
    assert_eq!(out, vec![answer(3, Ok(()))]);
    // and the key is no longer pending
    out.clear();
    r.tick(t + Duration::from_secs(5), &c, &mut out);
    assert!(out.is_empty());
}

#[test]
fn acks_of_later_announcements_count_but_old_foreign_or_unknown_ones_do_not() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let mut out = Vec::new();
    r.join(t, &c, seat(9, 109, 6), 9, 9, &mut out);
    let older = ids(&out)[0];
    let first = two_waiting(&mut r, &c, t);
    out.clear();
    r.tick(t + RESEND_AFTER, &c, &mut out);
    let later = out
        .iter()
        .find_map(|a| match a {
            Action::Announce { update, .. } if update.key == key() => Some(update.id),
            _ => None,
        })
        .expect("re-announced");
    assert!(later > first);
    out.clear();
    r.applied(&c, later, key(), 0, 10, &mut out);
    // an id older than the first announcement, one of another instance, an unknown replica,
    // a key without a pending join: none counts
    r.applied(&c, older, key(), 0, 11, &mut out);
    r.applied(&c, GatewayMsgId::new(8, 1_000), key(), 0, 11, &mut out);
    r.applied(&c, first, key(), 0, 99, &mut out);
    r.applied(&c, first, key(), 1, 11, &mut out);
    r.applied(&c, first, RouteKey::room(5), 1, 20, &mut out);
    assert!(out.is_empty(), "{out:?}");
    r.applied(&c, first, key(), 0, 11, &mut out);
    assert_eq!(answers(&out), vec![(1, Ok(())), (2, Ok(()))]);
}

#[test]
fn a_change_of_the_broker_view_can_complete_a_join() {
    let (mut c, t, mut r) = (cluster(), Instant::now(), rooms());
    let id = two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.applied(&c, id, key(), 0, 10, &mut out);
    r.brokers_changed(&c, &mut out);
    assert!(out.is_empty());
    // replica 11 stops running: 10 alone serves the key, and it acked
    let run = NodeState::Running;
    c.brokers = view(vec![
        vec![member(10, 7000, run), member(11, 7001, NodeState::Init)],
        vec![member(20, 7100, run)],
    ]);
    r.brokers_changed(&c, &mut out);
    assert_eq!(answers(&out), vec![(1, Ok(())), (2, Ok(()))]);
}

#[test]
fn unconfirmed_joins_are_announced_again_every_500_ms() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    two_waiting(&mut r, &c, t);
    let resend = vec![(key(), true, false, Why::Resend)];
    let mut out = Vec::new();
    r.tick(t + Duration::from_millis(499), &c, &mut out);
    assert!(out.is_empty());
    r.tick(t + Duration::from_millis(500), &c, &mut out);
    assert_eq!(announced(&out), resend);
    out.clear();
    r.tick(t + Duration::from_millis(999), &c, &mut out);
    assert!(out.is_empty());
    r.tick(t + Duration::from_millis(1000), &c, &mut out);
    assert_eq!(announced(&out), resend);
}

#[test]
fn a_join_not_confirmed_in_time_fails_and_withdraws_the_key() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let id = two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.applied(&c, id, key(), 0, 10, &mut out);
    r.tick(t + Duration::from_millis(2999), &c, &mut out);
    assert!(answers(&out).is_empty());
    out.clear();
    r.tick(t + Duration::from_secs(3), &c, &mut out);
    let failed = answers(&out);
    let timeout = Err(JoinError::Timeout);
    assert_eq!(failed, vec![(1, timeout), (2, timeout)]);
    let withdrawn: Vec<_> = announced(&out).into_iter().filter(|a| !a.1).collect();
    assert_eq!(withdrawn, vec![(key(), false, true, Why::Leave)]);
    assert_eq!(r.members(ROOM).count(), 0);
    assert!(r.keys.is_empty());
    assert_eq!(
        JoinError::Timeout.to_string(),
        "the cluster did not confirm the room's route in time"
    );
}

#[test]
fn without_a_running_broker_replica_a_join_only_times_out() {
    let (mut c, t, mut r) = (cluster(), Instant::now(), rooms());
    c.brokers = view(vec![vec![], vec![member(20, 7100, NodeState::Running)]]);
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 101, ROOM), 1, 1, &mut out);
    let id = ids(&out)[0];
    out.clear();
    r.applied(&c, id, key(), 0, 10, &mut out);
    r.brokers_changed(&c, &mut out);
    assert!(out.is_empty());
    r.tick(t + Duration::from_secs(3), &c, &mut out);
    assert_eq!(answers(&out), vec![(1, Err(JoinError::Timeout))]);
}

#[test]
fn the_last_member_leaving_withdraws_the_key_twice() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let id = two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.applied(&c, id, key(), 0, 10, &mut out);
    r.applied(&c, id, key(), 0, 11, &mut out);
    out.clear();
    r.leave(t, &c, seat(1, 101, ROOM), &mut out);
    assert!(out.is_empty());
    // leaving again, or a room never joined, changes nothing
    r.leave(t, &c, seat(1, 101, ROOM), &mut out);
    r.leave(t, &c, seat(2, 102, 5), &mut out);
    assert!(out.is_empty());
    r.leave(t, &c, seat(2, 102, ROOM), &mut out);
    assert_eq!(announced(&out), vec![(key(), false, true, Why::Leave)]);
    out.clear();
    // the next member is the first again
    r.join(t, &c, seat(3, 103, ROOM), 3, 3, &mut out);
    assert_eq!(announced(&out), vec![(key(), true, true, Why::Join)]);
}

#[test]
fn leaving_before_the_confirmation_fails_that_join_only() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.leave(t, &c, seat(2, 102, ROOM), &mut out);
    assert_eq!(out, vec![answer(2, Err(JoinError::Left))]);
    out.clear();
    r.leave(t, &c, seat(1, 101, ROOM), &mut out);
    assert_eq!(answers(&out), vec![(1, Err(JoinError::Left))]);
    assert_eq!(announced(&out), vec![(key(), false, true, Why::Leave)]);
    assert_eq!(
        JoinError::Left.to_string(),
        "left before the join completed"
    );
}

#[test]
fn refresh_and_shutdown_announce_every_key_once() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 101, ROOM), 1, 1, &mut out);
    r.join(t, &c, seat(2, 102, 5), 2, 2, &mut out);
    out.clear();
    r.refresh(t, &c, &mut out);
    let mut a = announced(&out);
    a.sort_by_key(|x| x.0);
    let k5 = RouteKey::room(5);
    let refresh = |k| (k, true, false, Why::Refresh);
    assert_eq!(a, vec![refresh(key()), refresh(k5)]);
    out.clear();
    r.shutdown(t, &c, &mut out);
    let mut a = announced(&out);
    a.sort_by_key(|x| x.0);
    let gone = |k| (k, false, false, Why::Shutdown);
    assert_eq!(a, vec![gone(key()), gone(k5)]);
}

#[test]
fn feedback_for_a_key_without_members_is_sent_about_once_a_second() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let k9 = RouteKey::room(9);
    let mut out = Vec::new();
    assert_eq!(r.room_message(t, &c, 1, k9, &mut out), Verdict::NoMembers);
    assert_eq!(announced(&out), vec![(k9, false, false, Why::Feedback)]);
    out.clear();
    let ms = |n| t + Duration::from_millis(n);
    r.room_message(ms(100), &c, 2, k9, &mut out);
    r.tick(ms(999), &c, &mut out);
    r.room_message(ms(999), &c, 3, k9, &mut out);
    assert!(out.is_empty(), "rate-limited");
    r.tick(ms(1000), &c, &mut out);
    r.room_message(ms(1000), &c, 4, k9, &mut out);
    assert_eq!(announced(&out), vec![(k9, false, false, Why::Feedback)]);
}

#[test]
fn duplicates_are_dropped_and_members_get_the_rest() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 101, ROOM), 11, 1, &mut out);
    out.clear();
    assert_eq!(r.room_message(t, &c, 1, key(), &mut out), Verdict::Deliver);
    assert_eq!(
        r.room_message(t, &c, 1, key(), &mut out),
        Verdict::Duplicate
    );
    assert_eq!(r.room_message(t, &c, 2, key(), &mut out), Verdict::Deliver);
    assert!(out.is_empty(), "no feedback for a key with members");
    assert_eq!(r.members(ROOM).copied().collect::<Vec<_>>(), vec![11]);
    // only the last `dedup_capacity` ids are remembered
    for id in 3..19 {
        r.room_message(t, &c, id, key(), &mut out);
    }
    assert_eq!(r.room_message(t, &c, 1, key(), &mut out), Verdict::Deliver);
}

#[test]
fn big_rooms_are_announced_per_virtual_room_and_delivered_per_room() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 65, 1500), 1, 1, &mut out);
    r.join(t, &c, seat(2, 2, 1500), 2, 2, &mut out);
    let joined: Vec<RouteKey> = announced(&out).into_iter().map(|a| a.0).collect();
    let v = |k| RouteKey::virtual_room(1500, k);
    assert_eq!(joined, vec![v(1), v(2)]);
    out.clear();
    // a message for a virtual room no member here is in: feedback for it, yet delivered to the room
    assert_eq!(r.room_message(t, &c, 1, v(3), &mut out), Verdict::Deliver);
    assert_eq!(announced(&out), vec![(v(3), false, false, Why::Feedback)]);
    assert_eq!(r.members(1500).count(), 2);
}

#[test]
fn a_new_registry_id_reannounces_and_pending_joins_wait_for_its_acks() {
    let (c, t, mut r) = (cluster(), Instant::now(), rooms());
    let old = two_waiting(&mut r, &c, t);
    let mut out = Vec::new();
    r.applied(&c, old, key(), 0, 10, &mut out);
    r.new_instance(t, &c, 9, &mut out);
    assert_eq!(
        announced(&out),
        vec![
            (key(), true, false, Why::Refresh),
            (key(), true, false, Why::Resend)
        ]
    );
    let new = ids(&out);
    assert!(new.iter().all(|id| id.instance() == 9));
    let Action::Announce { update, .. } = &out[0] else {
        panic!("an announcement");
    };
    assert_eq!(update.gateway.instance, 9);
    out.clear();
    // acks of the old instance no longer count, and 10 must ack again
    r.applied(&c, old, key(), 0, 11, &mut out);
    r.applied(&c, new[1], key(), 0, 11, &mut out);
    assert!(out.is_empty());
    r.applied(&c, new[1], key(), 0, 10, &mut out);
    assert_eq!(answers(&out), vec![(1, Ok(())), (2, Ok(()))]);
}

#[test]
fn announcements_prefer_routers_that_answer_pings() {
    let (mut c, t, mut r) = (cluster(), Instant::now(), rooms());
    let run = NodeState::Running;
    c.routers = view(vec![vec![member(1, 6000, run), member(2, 6001, run)]]);
    // room 4 picks replica 4 % 2 = 0 (port 6000) while both are alive
    let mut out = Vec::new();
    r.join(t, &c, seat(1, 101, ROOM), 1, 1, &mut out);
    let to = |out: &[Action]| match &out[0] {
        Action::Announce { to, .. } => to.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(to(&out), vec![addr(6000)]);
    // 6000 stops answering pings: the alive one
    c.router_live.ping_sent(addr(6000), t);
    let later = t + Duration::from_secs(2);
    out.clear();
    r.refresh(later, &c, &mut out);
    assert_eq!(to(&out), vec![addr(6001)]);
    // none answers: the rule over all running replicas
    c.router_live.ping_sent(addr(6001), t);
    out.clear();
    r.refresh(later, &c, &mut out);
    assert_eq!(to(&out), vec![addr(6000)]);
    // no running router: nowhere to send
    c.routers = view(vec![vec![member(1, 6000, NodeState::Init)]]);
    out.clear();
    r.refresh(later, &c, &mut out);
    assert_eq!(to(&out), Vec::<SocketAddr>::new());
}
