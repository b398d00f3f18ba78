//! A chunk as stored and sent: `codec u8 | raw length u32 LE | payload`. Codec 0 is the raw bytes
//! (used when compression does not shrink them), codec 1 is one zstd frame.

use crate::id::ChunkId;
use crate::Error;

/// zstd level for chunks: level 3 is zstd's default, within a few percent of level 9's ratio on
/// disk images at several times the speed.
pub const ZSTD_LEVEL: i32 = 3;
const RAW: u8 = 0;
const ZSTD: u8 = 1;
const HEADER: usize = 5;

/// Compresses one chunk into a blob.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len() / 2);
    out.push(ZSTD);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)
        .ok()
        .filter(|c| c.len() < data.len());
    match compressed {
        Some(c) => out.extend_from_slice(&c),
        None => {
            out[0] = RAW;
            out.extend_from_slice(data);
        }
    }
    out
}

/// The raw length a blob claims, without decompressing it.
pub fn raw_len(blob: &[u8]) -> Result<usize, Error> {
    let h = blob
        .get(..HEADER)
        .ok_or_else(|| Error::Corrupt("chunk blob shorter than its header".into()))?;
    Ok(u32::from_le_bytes(h[1..5].try_into().expect("4")) as usize)
}

/// Decompresses a blob.
pub fn decode(blob: &[u8]) -> Result<Vec<u8>, Error> {
    let len = raw_len(blob)?;
    let payload = &blob[HEADER..];
    match blob[0] {
        RAW if payload.len() == len => Ok(payload.to_vec()),
        RAW => Err(Error::Corrupt(format!(
            "raw chunk holds {} bytes, header says {len}",
            payload.len()
        ))),
        ZSTD => {
            let out = zstd::bulk::decompress(payload, len).map_err(|e| Error::Corrupt(format!("zstd: {e}")))?;
            if out.len() != len {
                return Err(Error::Corrupt(format!(
                    "chunk decompressed to {} bytes, header says {len}",
                    out.len()
                )));
            }
            Ok(out)
        }
        c => Err(Error::Corrupt(format!("unknown chunk codec {c}"))),
    }
}

/// Decompresses a blob and checks that its content hashes to `id`.
pub fn open_verified(id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>, Error> {
    let data = decode(blob).map_err(|e| Error::Corrupt(format!("chunk {id}: {e}")))?;
    if ChunkId::of(&data) != *id {
        return Err(Error::Corrupt(format!(
            "chunk {id}: content hashes to {}",
            ChunkId::of(&data)
        )));
    }
    Ok(data)
}
