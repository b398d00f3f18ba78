//! The agent's request handling, through its router, against the simulated driver (and a
//! driver that fails on purpose, for the error mapping).

use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use shoal_hv::{HvError, SimDriver, SourceError, TemplateFile};
use shoal_model::agent::{ConsoleChunk, VmSpec};
use shoal_model::{Power, TemplateDisk};
use tower::ServiceExt;
use uuid::Uuid;

use super::*;

fn state(hv: Arc<dyn Hypervisor>, token: Option<&str>) -> AgentState {
    AgentState {
        hv,
        net: None,
        require: token.map(hash_token),
    }
}

fn sim() -> AgentState {
    state(Arc::new(SimDriver::ephemeral(Duration::ZERO)), None)
}

fn spec(name: &str) -> VmSpec {
    VmSpec::example(name)
}

/// Sends one request through the agent's router; answers with the status and the JSON body
/// (`Null` when the body is not JSON).
async fn call(
    state: &AgentState,
    method: Method,
    uri: &str,
    body: Option<Body>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let resp = router(state.clone())
        .oneshot(req.body(body.unwrap_or_else(Body::empty)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn post(state: &AgentState, uri: &str, body: Value) -> (StatusCode, Value) {
    call(state, Method::POST, uri, Some(Body::from(body.to_string())), None).await
}

async fn get(state: &AgentState, uri: &str) -> (StatusCode, Value) {
    call(state, Method::GET, uri, None, None).await
}

fn vms(body: &Value) -> Vec<VmStatus> {
    serde_json::from_value(body["vms"].clone()).unwrap()
}

#[tokio::test]
async fn ensure_list_and_remove_are_idempotent() {
    let st = sim();
    let s = spec("a-0");
    let (code, first) = post(&st, "/v1/vms/ensure", json!({ "vms": [s] })).await;
    assert_eq!(code, StatusCode::OK);
    let first = vms(&first);
    assert_eq!(
        (first.len(), first[0].uuid, first[0].state),
        (1, s.uuid, VmState::Running)
    );
    let (_, again) = post(&st, "/v1/vms/ensure", json!({ "vms": [s] })).await;
    assert_eq!(vms(&again), first, "a second ensure changes nothing");
    let (code, listed) = get(&st, "/v1/vms").await;
    let listed = vms(&listed);
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        listed.iter().map(|v| (v.uuid, v.state, v.seq)).collect::<Vec<_>>(),
        [(s.uuid, VmState::Running, first[0].seq)],
        "one VM, as ensured"
    );

    let stopped = VmSpec {
        power: Power::Stopped,
        ..s.clone()
    };
    let (_, r) = post(&st, "/v1/vms/ensure", json!({ "vms": [stopped] })).await;
    let r = vms(&r);
    assert_eq!(r[0].state, VmState::Stopped);
    assert!(r[0].seq > first[0].seq);

    for _ in 0..2 {
        let (code, r) = post(&st, "/v1/vms/remove", json!({ "uuids": [s.uuid, Uuid::new_v4()] })).await;
        assert_eq!(code, StatusCode::OK);
        assert!(vms(&r).is_empty(), "nothing failed to go: {r}");
    }
    assert!(vms(&get(&st, "/v1/vms").await.1).is_empty());
}

#[tokio::test]
async fn the_console_reads_slices_and_unknown_vms_are_not_found() {
    let st = sim();
    let s = spec("a-0");
    post(&st, "/v1/vms/ensure", json!({ "vms": [s] })).await;
    let (code, c) = get(&st, &format!("/v1/vms/{}/console?offset=2&max=5", s.uuid)).await;
    assert_eq!(code, StatusCode::OK);
    let c: ConsoleChunk = serde_json::from_value(c).unwrap();
    assert_eq!((c.offset, c.next, c.data.as_str()), (2, 7, "m: a-"));
    let (_, again) = get(&st, &format!("/v1/vms/{}/console?offset=2&max=5", s.uuid)).await;
    assert_eq!(serde_json::from_value::<ConsoleChunk>(again).unwrap(), c);

    let ghost = Uuid::new_v4();
    let (code, e) = get(&st, &format!("/v1/vms/{ghost}/console")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
    assert!(
        e["error"]["message"].as_str().unwrap().contains(&ghost.to_string()),
        "{e}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_saying_what_is_wrong() {
    let st = sim();
    let (code, e) = post(&st, "/v1/vms/ensure", json!({ "vms": [{ "name": 1 }] })).await;
    assert_eq!(
        (code, &e["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid")),
        "{e}"
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("vms[0]"), "{e}");
    let (code, e) = call(&st, Method::POST, "/v1/vms/remove", Some(Body::from("not json")), None).await;
    assert_eq!(
        (code, &e["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid")),
        "{e}"
    );
    let (code, e) = get(&st, "/v1/vms/not-a-uuid/console").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("not-a-uuid"), "{e}");
    let (code, e) = get(&st, &format!("/v1/vms/{}/console?offset=-1", Uuid::new_v4())).await;
    assert_eq!(
        (code, &e["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid")),
        "{e}"
    );
    let (code, e) = post(&st, "/v1/underlay/probe", json!({ "address": "nowhere", "port": 1 })).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{e}");
    // None of it created anything.
    assert!(vms(&get(&st, "/v1/vms").await.1).is_empty());
}

#[tokio::test]
async fn off_loopback_commands_need_the_controllers_token() {
    let st = state(Arc::new(SimDriver::ephemeral(Duration::ZERO)), Some("s3cret"));
    for token in [None, Some("wrong")] {
        let (code, e) = call(&st, Method::GET, "/v1/vms", None, token).await;
        assert_eq!(
            (code, &e["error"]["code"]),
            (StatusCode::UNAUTHORIZED, &json!("unauthorized"))
        );
        let body = Body::from(json!({ "vms": [spec("a-0")] }).to_string());
        let (code, _) = call(&st, Method::POST, "/v1/vms/ensure", Some(body), token).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
    }
    assert!(st.hv.list().await.is_empty(), "a refused ensure ran");
    let (code, _) = call(&st, Method::GET, "/v1/vms", None, Some("s3cret")).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = call(&st, Method::GET, "/healthz", None, None).await;
    assert_eq!(code, StatusCode::OK, "health needs no token");
}

#[tokio::test]
async fn a_driver_without_disks_refuses_snapshots() {
    let st = sim();
    let s = spec("a-0");
    post(&st, "/v1/vms/ensure", json!({ "vms": [s] })).await;
    let (code, e) = post(&st, &format!("/v1/vms/{}/snapshot", s.uuid), json!({})).await;
    assert_eq!(
        (code, &e["error"]["code"]),
        (StatusCode::CONFLICT, &json!("snapshot_failed"))
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("keeps no disks"),
        "{e}"
    );
}

/// The simulated driver, but `ensure` fails with the next error queued.
struct Failing {
    sim: SimDriver,
    next: Mutex<Vec<HvError>>,
}

#[async_trait::async_trait]
impl Hypervisor for Failing {
    fn driver(&self) -> String {
        "failing".into()
    }
    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError> {
        let next = self.next.lock().unwrap().pop();
        match next {
            Some(e) => Err(e),
            None => self.sim.ensure(spec).await,
        }
    }
    async fn remove(&self, uuid: Uuid) -> Result<(), HvError> {
        self.sim.remove(uuid).await
    }
    async fn list(&self) -> Vec<VmStatus> {
        self.sim.list().await
    }
    async fn console(&self, uuid: Uuid, offset: u64, max: usize) -> Result<ConsoleChunk, HvError> {
        self.sim.console(uuid, offset, max).await
    }
    async fn fence(&self) -> usize {
        self.sim.fence().await
    }
}

#[tokio::test]
async fn ensure_failures_are_reported_by_kind() {
    let hv = Arc::new(Failing {
        sim: SimDriver::ephemeral(Duration::ZERO),
        next: Mutex::new(Vec::new()),
    });
    let st = state(hv.clone(), None);
    let fail_next = |e: HvError| hv.next.lock().unwrap().push(e);
    let unreachable = || HvError::Fetch {
        template: "t".into(),
        file: TemplateFile::Disk,
        source: SourceError::Unreachable {
            what: "the controller".into(),
            source: "connection refused".into(),
        },
    };
    let ensure = |s: &VmSpec| {
        let (st, s) = (st.clone(), s.clone());
        async move { vms(&post(&st, "/v1/vms/ensure", json!({ "vms": [s] })).await.1).remove(0) }
    };

    // Retryable, for a VM the host does not have yet: still pending, with the reason.
    let s = spec("a-0");
    fail_next(unreachable());
    let r = ensure(&s).await;
    assert_eq!((r.state, r.seq), (VmState::Pending, 0));
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("connection refused") && reason.ends_with("will retry"),
        "{reason}"
    );
    // ... and the next ensure does it.
    let running = ensure(&s).await;
    assert_eq!((running.state, running.reason.as_deref()), (VmState::Running, None));

    // Retryable, for a VM the host has: it keeps its state and sequence number.
    fail_next(unreachable());
    let r = ensure(&VmSpec {
        power: Power::Stopped,
        ..s.clone()
    })
    .await;
    assert_eq!((r.state, r.seq), (VmState::Running, running.seq), "{r:?}");
    assert!(r.reason.is_some());

    // Dead: the VM has failed, and says why.
    fail_next(HvError::QemuExited {
        how: "QEMU was killed by signal 9".into(),
        log: String::new(),
    });
    let r = ensure(&s).await;
    assert_eq!(
        (r.state, r.reason.as_deref()),
        (VmState::Failed, Some("QEMU was killed by signal 9"))
    );

    // Bad input: failed, naming the value.
    fail_next(TemplateDisk::parse("sha1:00").unwrap_err().into());
    let r = ensure(&spec("a-1")).await;
    assert_eq!(r.state, VmState::Failed);
    assert!(r.reason.unwrap().contains("\"sha1:00\""));
}

/// Self-fencing: only once the lease ran out, only with peers, and not while a strict majority
/// of them is reached within the lease.
#[test]
fn an_agent_fences_itself_only_past_its_lease_and_out_of_reach_of_most_peers() {
    use std::time::Instant;
    let peer = |h: &str| shoal_model::agent::PeerAddress {
        host: h.into(),
        address: "127.0.0.1:1".into(),
    };
    let lease = Duration::from_millis(50);
    let long_ago = Instant::now() - Duration::from_secs(1);
    let mut s = crate::Standing {
        acked: Some(Instant::now()),
        lease: Some(lease),
        peers: vec![peer("a"), peer("b"), peer("c")],
        ..Default::default()
    };
    assert!(!s.must_fence(), "within the lease");
    s.acked = Some(long_ago);
    assert!(s.must_fence(), "lease over, no peer reached");
    s.reached.insert("a".into(), (Instant::now(), 0));
    assert!(s.must_fence(), "1 of 3 is no majority");
    s.reached.insert("b".into(), (Instant::now(), 0));
    assert!(
        !s.must_fence(),
        "2 of 3 reached: the controller hears of it through them"
    );
    s.reached.insert("b".into(), (long_ago, 0));
    assert!(s.must_fence(), "a peer reached before the lease does not count");
    s.fenced = true;
    assert!(!s.must_fence(), "fenced once until the lease is renewed");
    s.fenced = false;
    s.peers.clear();
    assert!(!s.must_fence(), "no peers: no other host could run its VMs");
    s.peers = vec![peer("a")];
    s.reached.clear();
    assert!(s.must_fence());
    s.reached.insert("a".into(), (Instant::now(), 0));
    assert!(!s.must_fence(), "1 of 1");
    s.lease = None;
    s.reached.clear();
    assert!(!s.must_fence(), "never heard from the controller: no lease to run out");
}
