//! The frame an agent sends its peers in immediate mode (`POST /.lockstep/changesets` on their
//! serve address): a changeset with its new blobs inline. Typed both ways: [`encode`] by the
//! forwarder, [`decode`] (every blob verified against its hash) by the agent API.

use bytes::{BufMut, Bytes, BytesMut};

use crate::sync::manifest::Hash;
use crate::sync::provenance::SignedChangeset;

/// Path of the peer endpoint on an agent's serve address.
pub const PEER_PATH: &str = "/.lockstep/changesets";
/// Content type of a framed changeset.
pub const FRAME_TYPE: &str = "application/x-lockstep-changeset";
/// Changesets carrying more new content than this are not sent to peers directly (they fetch
/// it through the hub).
pub const MAX_INLINE_BYTES: u64 = 16 * 1024 * 1024;
/// Why a frame is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Cut short or malformed.
    #[error("malformed changeset frame: {0}")]
    Malformed(String),
    /// A blob does not hash to its name.
    #[error("blob {0} does not match its hash")]
    Damaged(Hash),
}

/// A changeset (signed by its origin, when it has a farm certificate) with its new blobs:
/// `u32` big-endian length of the JSON, the JSON, then each blob of the changeset's
/// `blobs()` in order.
pub fn encode(cs: &SignedChangeset, blob: impl Fn(&Hash) -> Option<Vec<u8>>) -> Option<Bytes> {
    // Protocol messages are plain structs: they always serialise.
    let json = serde_json::to_vec(cs).expect("changeset serialises");
    let blobs = cs.changeset.blobs();
    let total: u64 = blobs.iter().map(|(_, n)| n).sum();
    let mut out = BytesMut::with_capacity(4 + json.len() + total as usize);
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    for (hash, size) in blobs {
        let b = blob(&hash)?;
        if b.len() as u64 != size {
            return None;
        }
        out.put_slice(&b);
    }
    Some(out.freeze())
}

/// Reads a frame: the changeset (checked; signed or bare) and its blobs, each verified
/// against its hash. Whether the signature is acceptable is the agent's trust to decide.
pub fn decode(frame: &[u8]) -> Result<(SignedChangeset, Vec<(Hash, Bytes)>), FrameError> {
    let bad = |m: &str| FrameError::Malformed(m.to_string());
    if frame.len() < 4 {
        return Err(bad("shorter than its header"));
    }
    let n = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let json = frame.get(4..4 + n).ok_or_else(|| bad("JSON cut short"))?;
    let cs = SignedChangeset::from_json(json).map_err(|e| FrameError::Malformed(e.to_string()))?;
    cs.changeset
        .check()
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut at = 4 + n;
    let mut blobs = Vec::new();
    for (hash, size) in cs.changeset.blobs() {
        let end = at
            .checked_add(size as usize)
            .filter(|&e| e <= frame.len())
            .ok_or_else(|| bad("blobs cut short"))?;
        let data = &frame[at..end];
        if Hash::of(data) != hash {
            return Err(FrameError::Damaged(hash));
        }
        blobs.push((hash, Bytes::copy_from_slice(data)));
        at = end;
    }
    if at != frame.len() {
        return Err(bad("bytes after the last blob"));
    }
    Ok((cs, blobs))
}
