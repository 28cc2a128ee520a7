use std::os::fd::AsFd;

use proptest::prelude::*;
use remotemedia_runtime_core::shm::broker::memfd;

use super::*;

const MIB: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        max_shm_bytes: 64 * MIB,
        session_quota_bytes: 16 * MIB,
        label_quota_bytes: 8 * MIB,
        max_regions_per_session: 16,
    }
}

fn books(limits: Limits) -> Arc<Books> {
    Arc::new(Books::new(limits))
}

fn size(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn code(result: Result<impl std::fmt::Debug, Refusal>) -> ErrorCode {
    result.unwrap_err().code
}

#[test]
fn allocation_rounds_up_to_pages_and_hands_out_a_sealed_region() {
    let books = books(limits());
    let session = books.open_session("app".into()).unwrap().id;
    let grant = books.allocate(session, size(5000), String::new()).unwrap();
    assert_eq!(grant.size.get(), 8192);
    memfd::verify(grant.fd.as_fd(), 8192).unwrap();
    assert_eq!(
        books.totals(),
        NodeTotals {
            sessions: 1,
            regions: 1,
            bytes: 8192
        }
    );
}

#[test]
fn quotas_and_the_node_cap_refuse_without_allocating() {
    let books = books(limits());
    let a = books.open_session("a".into()).unwrap().id;
    books.allocate(a, size(8 * MIB), "l".into()).unwrap();
    assert_eq!(
        code(books.allocate(a, size(1), "l".into())),
        ErrorCode::ResourceExhausted,
        "label quota"
    );
    books.allocate(a, size(8 * MIB), "m".into()).unwrap();
    assert_eq!(
        code(books.allocate(a, size(1), "n".into())),
        ErrorCode::ResourceExhausted,
        "session quota"
    );
    let before = books.totals();
    let others: Vec<_> = (0..3)
        .map(|_| books.open_session("b".into()).unwrap().id)
        .collect();
    for &b in &others {
        books.allocate(b, size(8 * MIB), "x".into()).unwrap();
        books.allocate(b, size(8 * MIB), "y".into()).unwrap();
    }
    // 64 MiB in use: the node cap refuses the next page, whatever the session.
    let fresh = books.open_session("c".into()).unwrap().id;
    let refusal = books.allocate(fresh, size(1), String::new()).unwrap_err();
    assert_eq!(refusal.code, ErrorCode::ResourceExhausted);
    assert!(
        refusal.message.contains("node shared-memory budget"),
        "{refusal}"
    );
    assert_eq!(books.totals().bytes, before.bytes + 48 * MIB);
    assert_eq!(books.stats(fresh), SessionStats::default());
}

#[test]
fn unknown_ids_and_ids_the_session_does_not_hold_answer_the_same() {
    let books = books(limits());
    let owner = books.open_session("a".into()).unwrap();
    let other = books.open_session("b".into()).unwrap();
    let grant = books.allocate(owner.id, size(4096), String::new()).unwrap();
    let unknown = RegionKey::random().unwrap();
    let never = books.release(other.id, unknown).unwrap_err();
    let not_held = books.release(other.id, grant.key).unwrap_err();
    assert_eq!(never, not_held);
    assert_eq!(never.code, ErrorCode::NotFound);
    assert_eq!(books.open(other.id, unknown).unwrap_err(), never);
    assert_eq!(books.hold(&other.token, grant.key).unwrap_err(), never);
}

#[test]
fn a_region_lives_while_any_session_holds_it() {
    let books = books(limits());
    let owner = books.open_session("a".into()).unwrap().id;
    let reader = books.open_session("b".into()).unwrap().id;
    let grant = books.allocate(owner, size(4096), "l".into()).unwrap();
    books.open(reader, grant.key).unwrap();
    books.close_session(owner);
    assert_eq!(books.totals().regions, 1, "the reader still holds it");
    assert_eq!(books.stats(reader).held_regions, 1);
    assert_eq!(
        books.stats(reader).charged_bytes,
        0,
        "readers are not charged"
    );
    books.release(reader, grant.key).unwrap();
    assert_eq!(books.totals().regions, 0);
    assert_eq!(books.totals().bytes, 0);
}

#[test]
fn an_in_flight_hold_keeps_a_region_past_its_sessions_disconnect() {
    let books = books(limits());
    let owner = books.open_session("a".into()).unwrap();
    let grant = books.allocate(owner.id, size(4096), String::new()).unwrap();
    let hold = books.hold(&owner.token, grant.key).unwrap();
    books.close_session(owner.id);
    assert_eq!(books.totals().regions, 1, "held by a request in flight");
    assert_eq!(books.totals().sessions, 0);
    drop(hold);
    assert_eq!(books.totals(), NodeTotals::default());
}

#[test]
fn closing_a_session_releases_and_uncharges_everything_it_held() {
    let books = books(limits());
    let session = books.open_session("a".into()).unwrap().id;
    for label in ["x", "x", "y"] {
        books.allocate(session, size(MIB), label.into()).unwrap();
    }
    let stats = books.stats(session);
    assert_eq!(stats.held_regions, 3);
    assert_eq!(stats.charged_bytes, 3 * MIB);
    assert_eq!(
        stats.labels,
        vec![
            LabelUsage {
                label: "x".into(),
                regions: 2,
                bytes: 2 * MIB
            },
            LabelUsage {
                label: "y".into(),
                regions: 1,
                bytes: MIB
            },
        ]
    );
    books.close_session(session);
    assert_eq!(books.totals(), NodeTotals::default());
    assert!(books.summaries().is_empty());
}

#[test]
fn adopt_re_enters_a_live_region_and_checks_seals_size_and_identity() {
    let before = books(limits());
    let session = before.open_session("a".into()).unwrap().id;
    let grant = before.allocate(session, size(8192), "l".into()).unwrap();
    let fd = grant.fd.as_fd().try_clone_to_owned().unwrap();
    drop(before);

    let after = books(limits());
    let session = after.open_session("a".into()).unwrap().id;
    let dup = || fd.try_clone().unwrap();
    assert_eq!(
        code(after.adopt(session, grant.key, size(4096), "l".into(), true, dup())),
        ErrorCode::InvalidArgument,
        "wrong size"
    );
    after
        .adopt(session, grant.key, size(8192), "l".into(), true, dup())
        .unwrap();
    assert_eq!(after.totals().bytes, 8192, "the node cap counts it again");
    assert_eq!(after.stats(session).charged_bytes, 8192);

    let imposter = memfd::create_sealed(8192).unwrap();
    let other = after.open_session("b".into()).unwrap().id;
    assert_eq!(
        code(after.adopt(other, grant.key, size(8192), String::new(), false, imposter)),
        ErrorCode::FailedPrecondition
    );
    let unsealed = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&unsealed, 4096).unwrap();
    assert_eq!(
        code(after.adopt(
            other,
            RegionKey::random().unwrap(),
            size(4096),
            String::new(),
            false,
            unsealed
        )),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn summaries_group_sessions_by_label_without_ids() {
    let books = books(limits());
    for label in ["worker", "worker", "app"] {
        let session = books.open_session(label.into()).unwrap().id;
        books.allocate(session, size(4096), String::new()).unwrap();
    }
    let summaries = books.summaries();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1].label, "worker");
    assert_eq!(summaries[1].sessions, 2);
    assert_eq!(summaries[1].regions, 2);
    assert_eq!(summaries[1].charged_bytes, 8192);
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize, u64),
    Open(usize, usize),
    Release(usize, usize),
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..3, 1u64..(3 * MIB)).prop_map(|(s, n)| Op::Allocate(s, n)),
        (0usize..3, 0usize..8).prop_map(|(s, r)| Op::Open(s, r)),
        (0usize..3, 0usize..8).prop_map(|(s, r)| Op::Release(s, r)),
        (0usize..3).prop_map(Op::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever sessions do, the node total never passes the cap, and once every session has
    /// closed nothing is left.
    #[test]
    fn books_balance_and_never_exceed_the_cap(ops in proptest::collection::vec(op(), 1..40)) {
        let books = books(Limits { max_shm_bytes: 8 * MIB, ..limits() });
        let mut sessions: Vec<SessionId> =
            (0..3).map(|_| books.open_session("p".into()).unwrap().id).collect();
        let mut keys = Vec::new();
        for op in ops {
            match op {
                Op::Allocate(s, n) => {
                    if let Ok(grant) = books.allocate(sessions[s], size(n), String::new()) {
                        keys.push(grant.key);
                    }
                }
                Op::Open(s, r) => if let Some(&key) = keys.get(r) {
                    let _ = books.open(sessions[s], key);
                },
                Op::Release(s, r) => if let Some(&key) = keys.get(r) {
                    let _ = books.release(sessions[s], key);
                },
                Op::Close(s) => {
                    books.close_session(sessions[s]);
                    sessions[s] = books.open_session("p".into()).unwrap().id;
                }
            }
            prop_assert!(books.totals().bytes <= 8 * MIB);
        }
        for session in sessions {
            books.close_session(session);
        }
        prop_assert_eq!(books.totals(), NodeTotals::default());
    }
}

/// A client session holding a fresh region, and a worker session.
fn client_and_worker(books: &Arc<Books>) -> (Ticket, RegionKey, SessionId) {
    let client = books.open_session("app".into()).unwrap();
    let key = books
        .allocate(client.id, size(4096), String::new())
        .unwrap()
        .key;
    let worker = books.open_session("worker".into()).unwrap().id;
    (client, key, worker)
}

#[test]
fn a_grant_is_honoured_once_and_only_while_its_request_is_in_flight() {
    let books = books(limits());
    let (client, key, worker) = client_and_worker(&books);
    let mut hold = books.hold(&client.token, key).unwrap();
    let group = books.grant_group();
    let grant = hold.grant(group).unwrap();
    let redeemed = books.redeem(worker, grant).unwrap();
    assert_eq!(redeemed.size.get(), 4096);
    assert!(
        redeemed.fd.is_some(),
        "first redemption carries the descriptor"
    );
    assert_eq!(code(books.redeem(worker, grant)), ErrorCode::NotFound);
    let unused = hold.grant(group).unwrap();
    drop(hold);
    assert_eq!(
        code(books.redeem(worker, unused)),
        ErrorCode::NotFound,
        "request finished"
    );
}

#[test]
fn the_other_grants_of_a_request_are_refused_to_another_session() {
    let books = books(limits());
    let (client, key, worker) = client_and_worker(&books);
    let intruder = books.open_session("intruder".into()).unwrap().id;
    let mut hold = books.hold(&client.token, key).unwrap();
    let group = books.grant_group();
    let (first, second) = (hold.grant(group).unwrap(), hold.grant(group).unwrap());
    books.redeem(worker, first).unwrap();
    assert_eq!(code(books.redeem(intruder, second)), ErrorCode::NotFound);
    books.redeem(worker, second).unwrap();
}

#[test]
fn a_region_the_session_holds_comes_back_as_its_handle_without_a_descriptor() {
    let books = books(limits());
    let (client, key, worker) = client_and_worker(&books);
    let redeem = || {
        let mut hold = books.hold(&client.token, key).unwrap();
        let grant = hold.grant(books.grant_group()).unwrap();
        books.redeem(worker, grant).unwrap()
    };
    let first = redeem();
    assert!(first.fd.is_some());
    let again = redeem();
    assert_eq!(again.handle, first.handle);
    assert!(again.fd.is_none(), "the cached mapping is reused");
    assert_eq!(books.stats(worker).held_regions, 1);
}

#[test]
fn forget_drops_the_workers_hold_and_the_region_goes_with_the_last_holder() {
    let books = books(limits());
    let (client, key, worker) = client_and_worker(&books);
    let mut hold = books.hold(&client.token, key).unwrap();
    let grant = hold.grant(books.grant_group()).unwrap();
    let handle = books.redeem(worker, grant).unwrap().handle;
    drop(hold);
    books.close_session(client.id);
    assert_eq!(books.totals().regions, 1, "the worker still holds it");
    books.forget(worker, handle).unwrap();
    assert_eq!(books.totals().regions, 0);
    assert_eq!(code(books.forget(worker, handle)), ErrorCode::NotFound);
}

#[test]
fn a_redemption_names_the_sessions_handles_that_nobody_else_holds_any_more() {
    let books = books(limits());
    let (client, released, worker) = client_and_worker(&books);
    let kept = books
        .allocate(client.id, size(4096), String::new())
        .unwrap()
        .key;
    let redeem = |key| {
        let mut hold = books.hold(&client.token, key).unwrap();
        let grant = hold.grant(books.grant_group()).unwrap();
        books.redeem(worker, grant).unwrap()
    };
    // A request uses `released` while its client lets it go.
    let mut in_flight = books.hold(&client.token, released).unwrap();
    let gone = books
        .redeem(worker, in_flight.grant(books.grant_group()).unwrap())
        .unwrap()
        .handle;
    assert!(redeem(kept).orphaned.is_empty(), "the client holds both");
    books.release(client.id, released).unwrap();
    assert!(
        redeem(kept).orphaned.is_empty(),
        "a region a request is using is not orphaned"
    );
    assert!(books.orphans(worker).is_empty());
    drop(in_flight);
    assert_eq!(books.orphans(worker), [gone], "asked without a redemption");
    assert_eq!(redeem(kept).orphaned, [gone]);
    books.forget(worker, gone).unwrap();
    assert_eq!(books.totals().regions, 1, "only `kept` is left");
    assert!(redeem(kept).orphaned.is_empty());
    assert!(books.orphans(worker).is_empty());
}
