//! Chunk batches on the wire, between a store and a remote one (client to controller, controller
//! to host): records of `chunk id (32 bytes) | blob length u32 LE | blob`, back to back. The
//! receiver verifies every blob against its id before storing any (`ImageStore::put_blobs`).

use crate::id::ChunkId;
use crate::Error;

/// Largest blob accepted: a 64 KiB chunk that did not compress, plus its header, with room.
pub const MAX_BLOB: usize = 1 << 20;

pub fn encode_batch(blobs: &[(ChunkId, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blobs.iter().map(|b| 36 + b.1.len()).sum());
    for (id, b) in blobs {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

pub fn decode_batch(mut b: &[u8]) -> Result<Vec<(ChunkId, Vec<u8>)>, Error> {
    let mut out = vec![];
    while !b.is_empty() {
        if b.len() < 36 {
            return Err(Error::Invalid(format!(
                "chunk batch: {} trailing bytes, a record header is 36",
                b.len()
            )));
        }
        let id = ChunkId(b[..32].try_into().expect("32"));
        let len = u32::from_le_bytes(b[32..36].try_into().expect("4")) as usize;
        if len > MAX_BLOB {
            return Err(Error::Invalid(format!(
                "chunk batch: chunk {id} claims {len} bytes, more than {MAX_BLOB}"
            )));
        }
        let blob = b.get(36..36 + len).ok_or_else(|| {
            Error::Invalid(format!(
                "chunk batch cut short in chunk {id} ({} of {len} bytes)",
                b.len() - 36
            ))
        })?;
        out.push((id, blob.to_vec()));
        b = &b[36 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let blobs = vec![(ChunkId::of(b"a"), vec![1, 2, 3]), (ChunkId::of(b"b"), vec![])];
        let enc = encode_batch(&blobs);
        assert_eq!(decode_batch(&enc).unwrap(), blobs);
        let err = decode_batch(&enc[..enc.len() - 40]).unwrap_err().to_string();
        assert!(err.contains("cut short") || err.contains("trailing"), "{err}");
    }
}
