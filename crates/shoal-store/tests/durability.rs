//! Crash-safety of the file backend: reopen, torn tails, corruption, compaction and locking.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_store::{Compare, FileStore, KeyValue, Op, Options, RangeResponse, Store, StoreError, Txn};

fn small_wal(limit: u64) -> Options {
    Options {
        wal_limit_bytes: limit,
        ..Options::default()
    }
}

fn wal(dir: &Path) -> PathBuf {
    dir.join("wal")
}

/// Writes a mix of puts, overwrites, deletes and prefix deletes; returns the state after each
/// write (index = revision).
async fn write_history(s: &FileStore, txns: u64) -> Vec<RangeResponse> {
    let mut states = vec![s.range("").await.unwrap()];
    for i in 0..txns {
        let key = format!("k/{:03}", i % 17);
        let txn = match i % 10 {
            7 => Txn::new().then(Op::Delete(format!("k/{:03}", (i + 3) % 17))),
            9 => Txn::new()
                .then(Op::DeletePrefix("k/00".into()))
                .then(Op::Put(key, vec![i as u8; 40])),
            _ => Txn::new()
                .when(Compare::Version("never".into(), 0))
                .then(Op::Put(key, format!("value {i}").into_bytes()))
                .then(Op::Put(format!("meta/{i}"), vec![0xAB; (i % 5) as usize])),
        };
        let before = s.revision().await.unwrap();
        let r = s.txn(txn).await.unwrap();
        if r.revision != before {
            states.push(s.range("").await.unwrap());
        }
    }
    states
}

fn assert_same(a: &RangeResponse, b: &RangeResponse) {
    assert_eq!(a.revision, b.revision);
    assert_eq!(a.kvs.len(), b.kvs.len());
    for (x, y) in a.kvs.iter().zip(&b.kvs) {
        assert_eq!(x, y);
    }
}

/// Byte offsets at which each WAL frame ends, by walking the length prefixes.
fn frame_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        off += 8 + len;
        ends.push(off);
    }
    assert_eq!(off, bytes.len(), "test expected a clean WAL");
    ends
}

#[tokio::test]
async fn reopen_preserves_keys_values_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let states = {
        let s = FileStore::open(dir.path()).unwrap();
        write_history(&s, 60).await
    };
    let last = states.last().unwrap();
    assert!(
        last.revision >= 55,
        "only missing-key deletes are no-ops (rev {})",
        last.revision
    );
    let s = FileStore::open(dir.path()).unwrap();
    assert_eq!(s.revision().await.unwrap(), last.revision);
    assert_same(&s.range("").await.unwrap(), last);

    // Writing continues from the recovered revision with correct versions.
    let before: KeyValue = last.kvs.iter().max_by_key(|kv| kv.version).unwrap().clone();
    assert!(before.version > 1 && before.create_revision < before.mod_revision);
    let rev = s.put(&before.key, b"after".to_vec()).await.unwrap();
    assert_eq!(rev, last.revision + 1);
    let after = s.get(&before.key).await.unwrap().unwrap();
    assert_eq!(after.create_revision, before.create_revision);
    assert_eq!(after.version, before.version + 1);
    drop(s);
    let s = FileStore::open(dir.path()).unwrap();
    assert_eq!(s.get(&before.key).await.unwrap().unwrap(), after);
}

#[tokio::test]
async fn truncated_wal_tail_recovers_acknowledged_prefix() {
    // How much of the last frame survives: part of the header, exactly the header, part of the
    // payload, all but its final byte.
    for keep in [3usize, 8, 12, usize::MAX] {
        let dir = tempfile::tempdir().unwrap();
        let states = {
            let s = FileStore::open(dir.path()).unwrap();
            write_history(&s, 20).await
        };
        let bytes = fs::read(wal(dir.path())).unwrap();
        let ends = frame_ends(&bytes);
        let last_start = ends[ends.len() - 2];
        let keep = keep.min(bytes.len() - last_start - 1);
        let f = OpenOptions::new().write(true).open(wal(dir.path())).unwrap();
        f.set_len((last_start + keep) as u64).unwrap();
        drop(f);

        let s = FileStore::open(dir.path()).unwrap();
        let expected = &states[states.len() - 2];
        assert_same(&s.range("").await.unwrap(), expected);
        assert_eq!(
            fs::metadata(wal(dir.path())).unwrap().len() as usize,
            ends[ends.len() - 2],
            "the torn frame must be cut off (kept {keep})"
        );
        // New appends land after the last good frame, so they survive another reopen.
        let rev = s.put("fresh", b"1".to_vec()).await.unwrap();
        assert_eq!(rev, expected.revision + 1);
        drop(s);
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.revision().await.unwrap(), rev);
        assert_eq!(s.get("fresh").await.unwrap().unwrap().value, b"1");
    }
}

#[tokio::test]
async fn garbage_after_last_record_is_discarded() {
    let garbage: [&[u8]; 3] = [
        &[0xde, 0xad, 0xbe],
        &[0; 4096],
        // A plausible header claiming more payload than exists.
        &[0x10, 0, 0, 0, 1, 2, 3, 4, 9, 9],
    ];
    for tail in garbage {
        let dir = tempfile::tempdir().unwrap();
        let states = {
            let s = FileStore::open(dir.path()).unwrap();
            write_history(&s, 12).await
        };
        let clean_len = fs::metadata(wal(dir.path())).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(wal(dir.path()))
            .unwrap()
            .write_all(tail)
            .unwrap();

        let s = FileStore::open(dir.path()).unwrap();
        assert_same(&s.range("").await.unwrap(), states.last().unwrap());
        assert_eq!(fs::metadata(wal(dir.path())).unwrap().len(), clean_len);
        s.put("after", b"x".to_vec()).await.unwrap();
        drop(s);
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.revision().await.unwrap(), states.last().unwrap().revision + 1);
    }
}

async fn expect_corrupt(dir: &Path, damage: impl FnOnce(&mut Vec<u8>, &[usize])) -> String {
    {
        let s = FileStore::open(dir).unwrap();
        write_history(&s, 10).await;
    }
    let mut bytes = fs::read(wal(dir)).unwrap();
    let len_before = bytes.len();
    let ends = frame_ends(&bytes);
    damage(&mut bytes, &ends);
    fs::write(wal(dir), &bytes).unwrap();
    let err = FileStore::open(dir).expect_err("damaged WAL must not open");
    assert_eq!(
        fs::metadata(wal(dir)).unwrap().len() as usize,
        len_before,
        "a corrupt WAL must be left untouched"
    );
    match &err {
        StoreError::Corrupt { path, .. } => assert!(path.ends_with("wal"), "path {path}"),
        other => panic!("expected Corrupt, got {other}"),
    }
    err.to_string()
}

#[tokio::test]
async fn flipped_byte_in_early_record_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let msg = expect_corrupt(dir.path(), |bytes, ends| {
        // Inside the second frame's payload.
        bytes[ends[0] + 12] ^= 0x40;
    })
    .await;
    let dir_str = dir.path().display().to_string();
    assert!(msg.contains(&dir_str), "message should name the file: {msg}");
    assert!(msg.contains("offset"), "message should give the offset: {msg}");
}

#[tokio::test]
async fn damaged_length_in_middle_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    // A huge length makes the frame look like it runs past the end of the file, which is what a
    // torn tail looks like; the valid frames after it must still be noticed.
    let msg = expect_corrupt(dir.path(), |bytes, ends| {
        bytes[ends[2] + 3] = 0x7f;
    })
    .await;
    assert!(msg.contains("offset"), "{msg}");
}

#[tokio::test]
async fn compaction_preserves_state_and_revision() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 2048;
    let (states, snapshot_len) = {
        let s = FileStore::open_with(dir.path(), small_wal(limit)).unwrap();
        let states = write_history(&s, 300).await;
        let wal_len = fs::metadata(wal(dir.path())).unwrap().len();
        assert!(
            wal_len <= limit + 1024,
            "the WAL must have been restarted (len {wal_len})"
        );
        let snapshot_len = fs::metadata(dir.path().join("snapshot")).unwrap().len();
        (states, snapshot_len)
    };
    assert!(snapshot_len > 0);
    let last = states.last().unwrap();
    let s = FileStore::open_with(dir.path(), small_wal(limit)).unwrap();
    assert_same(&s.range("").await.unwrap(), last);
    assert_eq!(s.revision().await.unwrap(), last.revision);
    drop(s);
    // Also with the default limit, i.e. nothing about recovery depends on the option.
    let s = FileStore::open(dir.path()).unwrap();
    assert_same(&s.range("").await.unwrap(), last);
}

#[tokio::test]
async fn crash_between_snapshot_rename_and_wal_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = FileStore::open(dir.path()).unwrap();
        write_history(&s, 40).await;
    }
    let stale_wal = fs::read(wal(dir.path())).unwrap();
    let last = {
        // A tiny limit compacts on the first write: snapshot written, WAL emptied.
        let s = FileStore::open_with(dir.path(), small_wal(1)).unwrap();
        s.put("trigger", b"t".to_vec()).await.unwrap();
        assert_eq!(fs::metadata(wal(dir.path())).unwrap().len(), 0);
        s.range("").await.unwrap()
    };
    // Simulate the crash: the snapshot is in place but the WAL still holds the records it covers.
    fs::write(wal(dir.path()), &stale_wal).unwrap();
    let s = FileStore::open(dir.path()).unwrap();
    assert_same(&s.range("").await.unwrap(), &last);
    // And new writes after the stale records still replay.
    let rev = s.put("next", b"n".to_vec()).await.unwrap();
    assert_eq!(rev, last.revision + 1);
    drop(s);
    let s = FileStore::open(dir.path()).unwrap();
    assert_eq!(s.revision().await.unwrap(), rev);
    assert_eq!(s.get("next").await.unwrap().unwrap().mod_revision, rev);
}

#[tokio::test]
async fn crash_while_writing_snapshot_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let s = FileStore::open_with(dir.path(), small_wal(512)).unwrap();
        write_history(&s, 50).await.pop().unwrap()
    };
    fs::write(dir.path().join("snapshot.tmp"), b"SHOALSNP half written").unwrap();
    let s = FileStore::open(dir.path()).unwrap();
    assert_same(&s.range("").await.unwrap(), &last);
    assert!(!dir.path().join("snapshot.tmp").exists());
}

#[tokio::test]
async fn damaged_snapshot_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = FileStore::open_with(dir.path(), small_wal(512)).unwrap();
        write_history(&s, 50).await;
    }
    let path = dir.path().join("snapshot");
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&path, &bytes).unwrap();
    match FileStore::open(dir.path()) {
        Err(StoreError::Corrupt { path, reason }) => {
            assert!(path.ends_with("snapshot"), "{path}");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_history_restarts_at_recovered_revision() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = FileStore::open(dir.path()).unwrap();
        for i in 0..5u8 {
            s.put("w", vec![i]).await.unwrap();
        }
    }
    let s = FileStore::open(dir.path()).unwrap();
    assert!(matches!(
        s.watch("", 4).await,
        Err(StoreError::Compacted {
            requested: 4,
            oldest: 5
        })
    ));
    let mut rx = s.watch("", 5).await.unwrap();
    s.put("w", b"new".to_vec()).await.unwrap();
    let ev = rx.try_recv().expect("event is queued before put returns");
    assert_eq!(ev.kv.mod_revision, 6);
    assert_eq!(ev.kv.version, 6);
}

#[tokio::test]
async fn second_open_of_locked_dir_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStore::open(dir.path()).unwrap();
    first.put("a", b"1".to_vec()).await.unwrap();
    let err = FileStore::open(dir.path()).expect_err("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");
    // Clones share the lock; it is released when the last handle goes.
    let clone = first.clone();
    drop(first);
    assert!(FileStore::open(dir.path()).is_err());
    drop(clone);
    let reopened = FileStore::open(dir.path()).unwrap();
    assert_eq!(reopened.get("a").await.unwrap().unwrap().value, b"1");
}

/// Not a benchmark harness, just a measurement: one txn of 1,000 puts of 500-byte values,
/// including the fsync. Run with `--nocapture` to see the numbers.
#[tokio::test]
async fn thousand_put_txn_timing() {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::open(dir.path()).unwrap();
    let mut times = Vec::new();
    for round in 0..10u64 {
        let mut txn = Txn::new();
        for i in 0..1000 {
            txn = txn.then(Op::Put(format!("bench/{i:04}"), vec![round as u8; 500]));
        }
        let start = Instant::now();
        let r = s.txn(txn).await.unwrap();
        times.push(start.elapsed());
        assert_eq!(r.revision, round + 1);
    }
    let kvs = s.range("bench/").await.unwrap().kvs;
    assert_eq!(kvs.len(), 1000);
    assert!(kvs.iter().all(|kv| kv.version == 10 && kv.value == [9u8; 500]));
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "1000-put txn (500 B values, incl. fsync): min {:.2} ms, median {:.2} ms, max {:.2} ms",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
}
