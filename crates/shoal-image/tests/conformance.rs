//! One suite, run against every chunk backend.

use shoal_image::{blob, ChunkBackend, ChunkId, MemoryBackend, PackBackend};

fn chunk(i: u32) -> (ChunkId, Vec<u8>) {
    let data: Vec<u8> = (0..4096u32).map(|k| (k.wrapping_mul(i + 7) >> 3) as u8).collect();
    (ChunkId::of(&data), blob::encode(&data))
}

fn suite(b: &dyn ChunkBackend) {
    let (a, ab) = chunk(1);
    let (c, cb) = chunk(2);
    // uncommitted writes are invisible; a dropped session changes nothing
    {
        let mut w = b.writer().unwrap();
        assert!(w.put(&a, &ab).unwrap());
        assert!(w.contains(&a));
        assert!(!b.contains(&a));
        assert_eq!(b.size(&a), None, "an uncommitted chunk has no size");
    }
    assert!(!b.contains(&a));
    assert_eq!(b.usage().chunks, 0);
    // commit makes them visible, duplicates are not written twice
    let mut w = b.writer().unwrap();
    assert!(w.put(&a, &ab).unwrap());
    assert!(!w.put(&a, &ab).unwrap());
    assert!(w.put(&c, &cb).unwrap());
    w.commit().unwrap();
    assert_eq!(b.get(&a).unwrap().unwrap(), ab);
    assert_eq!(b.get(&c).unwrap().unwrap(), cb);
    assert_eq!(b.size(&a), Some(ab.len() as u64));
    assert_eq!(b.size(&c), Some(cb.len() as u64));
    let mut w = b.writer().unwrap();
    assert!(!w.put(&a, &ab).unwrap(), "a committed chunk is not written again");
    w.commit().unwrap();
    let mut l = b.list();
    l.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(l, want);
    let u = b.usage();
    assert_eq!(u.chunks, 2);
    assert_eq!(u.blob_bytes, (ab.len() + cb.len()) as u64);
    assert!(u.stored_bytes >= u.blob_bytes);
    // two sessions writing the same chunk both commit; it is held once
    let (d, db) = chunk(3);
    let mut w1 = b.writer().unwrap();
    let mut w2 = b.writer().unwrap();
    w1.put(&d, &db).unwrap();
    w2.put(&d, &db).unwrap();
    w1.commit().unwrap();
    w2.commit().unwrap();
    assert_eq!(b.usage().chunks, 3);
    assert_eq!(b.get(&d).unwrap().unwrap(), db);
    // remove and compact keep the rest readable
    b.remove(&[a, d]).unwrap();
    assert!(!b.contains(&a));
    assert!(b.get(&a).unwrap().is_none());
    assert_eq!(b.size(&a), None);
    b.compact().unwrap();
    assert_eq!(b.get(&c).unwrap().unwrap(), cb);
    assert_eq!(b.usage().chunks, 1);
    b.remove(&[ChunkId([9; 32])]).unwrap();
    assert_eq!(b.usage().chunks, 1);
}

#[test]
fn memory_backend_conforms() {
    suite(&MemoryBackend::new());
}

#[test]
fn pack_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    suite(&PackBackend::open(dir.path()).unwrap());
}

#[test]
fn pack_backend_survives_reopen_and_drops_aborted_packs() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ab) = chunk(1);
    let (c, cb) = chunk(2);
    {
        let b = PackBackend::open(dir.path()).unwrap();
        let mut w = b.writer().unwrap();
        w.put(&a, &ab).unwrap();
        w.commit().unwrap();
        let mut w = b.writer().unwrap();
        w.put(&c, &cb).unwrap();
        // a crash mid-session: the pack is on disk without its index
        std::mem::forget(w);
    }
    let packs = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(packs, 3, "one committed pack + index, one orphan pack");
    let b = PackBackend::open(dir.path()).unwrap();
    assert_eq!(b.get(&a).unwrap().unwrap(), ab);
    assert!(!b.contains(&c));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "the orphan pack was removed"
    );
    // removals and compaction persist
    let mut w = b.writer().unwrap();
    w.put(&c, &cb).unwrap();
    w.commit().unwrap();
    b.remove(&[a]).unwrap();
    b.compact().unwrap();
    drop(b);
    let b = PackBackend::open(dir.path()).unwrap();
    assert!(!b.contains(&a));
    assert_eq!(b.get(&c).unwrap().unwrap(), cb);
}
