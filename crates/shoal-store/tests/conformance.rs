//! Behaviours every `Store` backend must share, written once against `dyn Store` and run against
//! each backend by the `conformance!` macro at the bottom.

use std::sync::Arc;
use std::time::Duration;

use shoal_store::{Compare, EventKind, FileStore, Op, Options, Store, StoreError, Txn, WatchEvent, Watcher};

/// Generous bound on waiting for an event that must already be queued; only reached on failure.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn next_event(rx: &mut Watcher) -> WatchEvent {
    tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .expect("timed out waiting for a watch event")
        .expect("watch channel closed")
}

fn assert_no_pending(rx: &mut Watcher) {
    // Events are queued before the txn that caused them returns, so anything missing or extra is
    // visible synchronously.
    if let Ok(ev) = rx.try_recv() {
        panic!("unexpected extra event {ev:?}");
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(key.to_string(), value.as_bytes().to_vec())
}

mod behaviours {
    use super::*;

    pub async fn revisions_count_effective_writes(s: Arc<dyn Store>) {
        assert_eq!(s.revision().await.unwrap(), 0);
        assert_eq!(s.put("a", b"1".to_vec()).await.unwrap(), 1);
        assert_eq!(s.put("b", b"2".to_vec()).await.unwrap(), 2);
        assert_eq!(s.put("a", b"3".to_vec()).await.unwrap(), 3);
        assert_eq!(s.revision().await.unwrap(), 3);

        // One txn with several writes is one revision, shared by all its keys.
        let r = s
            .txn(
                Txn::new()
                    .then(put("c", "x"))
                    .then(put("d", "y"))
                    .then(Op::Delete("b".into())),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, 4);
        assert_eq!(s.get("c").await.unwrap().unwrap().mod_revision, 4);
        assert_eq!(s.get("d").await.unwrap().unwrap().mod_revision, 4);
        assert_eq!(s.get("b").await.unwrap(), None);

        // Deleting what is not there changes nothing, so the revision must not move.
        assert_eq!(s.delete("missing").await.unwrap(), 4);
        let r = s
            .txn(Txn::new().then(Op::DeletePrefix("nothing/".into())))
            .await
            .unwrap();
        assert_eq!(r.revision, 4);
        let r = s.txn(Txn::new()).await.unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, 4);
        assert_eq!(s.revision().await.unwrap(), 4);
    }

    pub async fn versions_and_create_revisions(s: Arc<dyn Store>) {
        s.put("k", b"v1".to_vec()).await.unwrap();
        s.put("other", b"x".to_vec()).await.unwrap();
        s.put("k", b"v2".to_vec()).await.unwrap();
        let kv = s.get("k").await.unwrap().unwrap();
        assert_eq!(kv.key, "k");
        assert_eq!(kv.value, b"v2");
        assert_eq!(kv.create_revision, 1);
        assert_eq!(kv.mod_revision, 3);
        assert_eq!(kv.version, 2);

        assert_eq!(s.delete("k").await.unwrap(), 4);
        assert_eq!(s.get("k").await.unwrap(), None);
        s.put("k", b"v3".to_vec()).await.unwrap();
        let kv = s.get("k").await.unwrap().unwrap();
        assert_eq!(kv.create_revision, 5, "re-creation starts a new lifetime");
        assert_eq!(kv.mod_revision, 5);
        assert_eq!(kv.version, 1);
    }

    pub async fn cas_on_mod_revision_picks_branch(s: Arc<dyn Store>) {
        // ModRevision 0 means "absent": create-if-not-exists.
        let create = |v: &str| {
            Txn::new()
                .when(Compare::ModRevision("lease".into(), 0))
                .then(put("lease", v))
                .or_else(put("lost", v))
        };
        let r = s.txn(create("first")).await.unwrap();
        assert!(r.succeeded);
        let r = s.txn(create("second")).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 2, "the failure branch wrote, so the revision moved");
        assert_eq!(s.get("lease").await.unwrap().unwrap().value, b"first");
        assert_eq!(s.get("lost").await.unwrap().unwrap().value, b"second");

        let held = s.get("lease").await.unwrap().unwrap().mod_revision;
        let stale = Txn::new()
            .when(Compare::ModRevision("lease".into(), held + 100))
            .then(put("lease", "stale"));
        let r = s.txn(stale).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 2, "an empty failure branch must not move the revision");
        let fresh = Txn::new()
            .when(Compare::ModRevision("lease".into(), held))
            .then(put("lease", "renewed"));
        assert!(s.txn(fresh).await.unwrap().succeeded);
        assert_eq!(s.get("lease").await.unwrap().unwrap().value, b"renewed");

        // Every comparison must hold.
        let mixed = Txn::new()
            .when(Compare::ModRevision("lease".into(), 3))
            .when(Compare::ModRevision("lost".into(), 0))
            .then(put("lease", "never"));
        assert!(!s.txn(mixed).await.unwrap().succeeded);
        assert_eq!(s.get("lease").await.unwrap().unwrap().value, b"renewed");
    }

    pub async fn version_compare(s: Arc<dyn Store>) {
        let absent = Txn::new().when(Compare::Version("v".into(), 0)).then(put("v", "a"));
        assert!(s.txn(absent.clone()).await.unwrap().succeeded);
        assert!(!s.txn(absent).await.unwrap().succeeded, "version 0 means absent");
        s.put("v", b"b".to_vec()).await.unwrap();
        let at2 = Txn::new().when(Compare::Version("v".into(), 2)).then(put("v", "c"));
        assert!(s.txn(at2.clone()).await.unwrap().succeeded);
        assert_eq!(s.get("v").await.unwrap().unwrap().version, 3);
        assert!(!s.txn(at2).await.unwrap().succeeded);
    }

    pub async fn value_compare(s: Arc<dyn Store>) {
        let when_empty = Txn::new()
            .when(Compare::Value("x".into(), Vec::new()))
            .then(put("hit", "1"));
        assert!(
            !s.txn(when_empty).await.unwrap().succeeded,
            "absent never equals a value"
        );
        assert_eq!(s.get("hit").await.unwrap(), None);

        s.put("x", b"on".to_vec()).await.unwrap();
        let when_off = Txn::new()
            .when(Compare::Value("x".into(), b"off".to_vec()))
            .then(put("x", "flipped"));
        assert!(!s.txn(when_off).await.unwrap().succeeded);
        let when_on = Txn::new()
            .when(Compare::Value("x".into(), b"on".to_vec()))
            .then(put("x", "off"));
        assert!(s.txn(when_on).await.unwrap().succeeded);
        assert_eq!(s.get("x").await.unwrap().unwrap().value, b"off");
    }

    pub async fn delete_prefix(s: Arc<dyn Store>) {
        for k in ["vm/a", "vm/b", "vm/c/d", "vmx", "vm", "w/vm/a"] {
            s.put(k, k.as_bytes().to_vec()).await.unwrap();
        }
        let r = s.txn(Txn::new().then(Op::DeletePrefix("vm/".into()))).await.unwrap();
        assert_eq!(r.revision, 7, "a prefix delete of many keys is one revision");
        let keys: Vec<String> = s.range("").await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["vm", "vmx", "w/vm/a"]);

        // Keys written earlier in the same txn are deleted too, and only effective deletes count.
        let r = s
            .txn(
                Txn::new()
                    .then(put("n/1", "a"))
                    .then(put("n/2", "b"))
                    .then(Op::DeletePrefix("n/".into()))
                    .then(put("n/3", "c")),
            )
            .await
            .unwrap();
        assert_eq!(r.revision, 8);
        let keys: Vec<String> = s.range("n/").await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["n/3"]);
    }

    pub async fn range_order_and_prefix_boundaries(s: Arc<dyn Store>) {
        for k in ["a/2", "ab", "a/10", "a", "a/1", "b/1", "a0", "a/"] {
            s.put(k, k.as_bytes().to_vec()).await.unwrap();
        }
        let r = s.range("a/").await.unwrap();
        let keys: Vec<&str> = r.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["a/", "a/1", "a/10", "a/2"]);
        assert_eq!(r.revision, 8);
        for kv in &r.kvs {
            assert_eq!(kv.value, kv.key.as_bytes());
        }
        let all: Vec<String> = s.range("").await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(all, ["a", "a/", "a/1", "a/10", "a/2", "a0", "ab", "b/1"]);
        assert!(s.range("c").await.unwrap().kvs.is_empty());
        assert_eq!(s.range("b/1").await.unwrap().kvs.len(), 1);
    }

    pub async fn watch_history_then_live(s: Arc<dyn Store>) {
        for i in 1..=5 {
            s.put(&format!("k/{i}"), vec![i]).await.unwrap();
        }
        let mut rx = s.watch("k/", 2).await.unwrap();
        for want in 3..=5u64 {
            let ev = next_event(&mut rx).await;
            assert_eq!(ev.kind, EventKind::Put);
            assert_eq!(ev.kv.mod_revision, want);
            assert_eq!(ev.kv.key, format!("k/{want}"));
        }
        assert_no_pending(&mut rx);
        s.put("k/1", b"again".to_vec()).await.unwrap();
        s.delete("k/2").await.unwrap();
        let ev = next_event(&mut rx).await;
        assert_eq!((ev.kind, ev.kv.mod_revision, ev.kv.version), (EventKind::Put, 6, 2));
        assert_eq!(ev.kv.value, b"again");
        let ev = next_event(&mut rx).await;
        assert_eq!(
            (ev.kind, ev.kv.key.as_str(), ev.kv.mod_revision),
            (EventKind::Delete, "k/2", 7)
        );
        assert!(ev.kv.value.is_empty());
        assert_no_pending(&mut rx);

        // Watching from the current revision yields only what comes next.
        let mut rx = s.watch("", 7).await.unwrap();
        assert_no_pending(&mut rx);
        s.put("z", b"1".to_vec()).await.unwrap();
        assert_eq!(next_event(&mut rx).await.kv.mod_revision, 8);

        // A future revision suppresses events until it is passed.
        let mut rx = s.watch("", 9).await.unwrap();
        s.put("z", b"2".to_vec()).await.unwrap();
        s.put("z", b"3".to_vec()).await.unwrap();
        assert_eq!(next_event(&mut rx).await.kv.mod_revision, 10);
        assert_no_pending(&mut rx);
    }

    /// A watcher started from a range's revision while writes race must see every later
    /// revision exactly once: a gap or duplicate between history and live shows up here.
    pub async fn watch_races_writers_without_gap(s: Arc<dyn Store>) {
        const WRITES: u64 = 200;
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..WRITES {
                    s.put(&format!("r/{}", i % 7), i.to_le_bytes().to_vec()).await.unwrap();
                }
            })
        };
        // Let the writer get some revisions in so that history replay has work to do.
        while s.revision().await.unwrap() < WRITES / 4 {
            tokio::task::yield_now().await;
        }
        let start = s.range("r/").await.unwrap().revision;
        let mut rx = s.watch("r/", start).await.unwrap();
        writer.await.unwrap();
        for want in start + 1..=WRITES {
            let ev = next_event(&mut rx).await;
            assert_eq!(ev.kv.mod_revision, want, "gap or duplicate in watch stream");
        }
        assert_no_pending(&mut rx);
    }

    pub async fn watch_filters_by_prefix(s: Arc<dyn Store>) {
        let mut rx = s.watch("vm/", 0).await.unwrap();
        s.put("vm/a", b"1".to_vec()).await.unwrap();
        s.put("vmx", b"2".to_vec()).await.unwrap();
        s.put("node/vm/a", b"3".to_vec()).await.unwrap();
        s.txn(Txn::new().then(put("vm/b", "4")).then(put("vn", "5")))
            .await
            .unwrap();
        s.delete("vmx").await.unwrap();
        s.delete("vm/a").await.unwrap();
        let got: Vec<(EventKind, String, u64)> = [
            next_event(&mut rx).await,
            next_event(&mut rx).await,
            next_event(&mut rx).await,
        ]
        .into_iter()
        .map(|e| (e.kind, e.kv.key, e.kv.mod_revision))
        .collect();
        assert_eq!(
            got,
            [
                (EventKind::Put, "vm/a".to_string(), 1),
                (EventKind::Put, "vm/b".to_string(), 4),
                (EventKind::Delete, "vm/a".to_string(), 6),
            ]
        );
        assert_no_pending(&mut rx);

        // History replay applies the same filter.
        let mut rx = s.watch("vm/", 0).await.unwrap();
        let keys: Vec<String> = [
            next_event(&mut rx).await,
            next_event(&mut rx).await,
            next_event(&mut rx).await,
        ]
        .into_iter()
        .map(|e| e.kv.key)
        .collect();
        assert_eq!(keys, ["vm/a", "vm/b", "vm/a"]);
        assert_no_pending(&mut rx);
    }

    /// `s` must retain at most 3 events of history.
    pub async fn watch_before_retained_history_is_compacted(s: Arc<dyn Store>) {
        for i in 0..10u8 {
            s.put("c", vec![i]).await.unwrap();
        }
        match s.watch("", 0).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!(requested, 0);
                assert!((7..=10).contains(&oldest), "oldest {oldest}");
            }
            other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
        }
        assert!(matches!(s.watch("", 5).await, Err(StoreError::Compacted { .. })));
        let mut rx = s.watch("", 8).await.unwrap();
        assert_eq!(next_event(&mut rx).await.kv.mod_revision, 9);
        assert_eq!(next_event(&mut rx).await.kv.mod_revision, 10);
        assert_no_pending(&mut rx);
        let mut rx = s.watch("", 10).await.unwrap();
        assert_no_pending(&mut rx);
    }

    pub async fn concurrent_cas_increments_are_exact(s: Arc<dyn Store>) {
        const TASKS: u64 = 8;
        const EACH: u64 = 25;
        let mut handles = Vec::new();
        for _ in 0..TASKS {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let mut done = 0;
                while done < EACH {
                    let current = s.get("counter").await.unwrap();
                    let (n, cmp) = match &current {
                        None => (0, Compare::ModRevision("counter".into(), 0)),
                        Some(kv) => (
                            String::from_utf8(kv.value.clone()).unwrap().parse::<u64>().unwrap(),
                            Compare::ModRevision("counter".into(), kv.mod_revision),
                        ),
                    };
                    let txn = Txn::new().when(cmp).then(put("counter", &(n + 1).to_string()));
                    if s.txn(txn).await.unwrap().succeeded {
                        done += 1;
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let kv = s.get("counter").await.unwrap().unwrap();
        assert_eq!(kv.value, (TASKS * EACH).to_string().as_bytes());
        assert_eq!(kv.version, TASKS * EACH);
        // Failed CASes wrote nothing, so each increment is exactly one revision.
        assert_eq!(s.revision().await.unwrap(), TASKS * EACH);
    }
}

/// Holds a store and whatever must outlive it (a temporary directory).
struct Backend {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn memory(options: Options) -> Backend {
    Backend {
        store: Arc::new(FileStore::in_memory_with(options)),
        _dir: None,
    }
}

fn file(options: Options) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open_with(dir.path().join("state"), options).unwrap();
    Backend {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

fn small_history() -> Options {
    Options {
        history_limit: 3,
        ..Options::default()
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    case!($name, Options::default());
                };
                ($name:ident, $options:expr) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let b = super::$backend($options);
                        behaviours::$name(b.store.clone()).await;
                    }
                };
            }

            case!(revisions_count_effective_writes);
            case!(versions_and_create_revisions);
            case!(cas_on_mod_revision_picks_branch);
            case!(version_compare);
            case!(value_compare);
            case!(delete_prefix);
            case!(range_order_and_prefix_boundaries);
            case!(watch_history_then_live);
            case!(watch_races_writers_without_gap);
            case!(watch_filters_by_prefix);
            case!(watch_before_retained_history_is_compacted, small_history());
            case!(concurrent_cas_increments_are_exact);

            /// The trait must also work from a current-thread runtime (the default for tests).
            #[tokio::test]
            async fn works_on_current_thread_runtime() {
                let b = super::$backend(Options::default());
                behaviours::revisions_count_effective_writes(b.store.clone()).await;
            }
        }
    };
}

conformance!(memory);
conformance!(file);

#[tokio::test]
async fn dropped_watchers_are_pruned() {
    let s = FileStore::in_memory();
    let keep = s.watch("", 0).await.unwrap();
    let gone = s.watch("a/", 0).await.unwrap();
    assert_eq!(s.watcher_count(), 2);
    drop(gone);
    s.put("a/1", b"x".to_vec()).await.unwrap();
    assert_eq!(s.watcher_count(), 1);
    drop(keep);
    s.put("b", b"y".to_vec()).await.unwrap();
    assert_eq!(s.watcher_count(), 0);
}
