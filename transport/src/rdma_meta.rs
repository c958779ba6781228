//! The pure part of the RDMA link protocol: the connection private data describing a peer's
//! receive ring, and the 32-bit immediate data carried by every message. Both arrive from the
//! peer, so they are decoded here without any verbs call (unit tests and fuzzing run it on
//! machines without RDMA hardware or libraries); `rdma.rs` uses these on real connections.

/// Wire format version in the private data.
pub const VERSION: u16 = 1;
/// First 4 bytes of the private data ("UPDR" little endian).
pub const MAGIC: u32 = 0x5244_5055;
/// Largest ring slot a peer may describe (bytes).
pub const MAX_SLOT_SIZE: u32 = 65536;
/// Most slots (data or control) a peer may describe: keeps the mod-256 counters unambiguous.
pub const MAX_SLOTS: u32 = 128;
/// Immediate-data low bits of a control message: the sender finished its direction.
pub const FLAG_FIN: u32 = 1;

/// Where a peer's receive ring is and its geometry (exchanged as connection private data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingInfo {
    /// Remote address of the ring.
    pub addr: u64,
    /// Remote key of the ring's memory region.
    pub rkey: u32,
    /// Data slots.
    pub slots: u32,
    /// Bytes per slot.
    pub slot_size: u32,
    /// Receive work requests reserved for control messages.
    pub ctrl: u32,
}

/// Private data that is not a usable ring description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct MetaError(pub String);

impl RingInfo {
    /// Encoded size.
    pub const LEN: usize = 28;

    /// The private data describing this ring.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.slots as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.slot_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.ctrl.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b[20..28].copy_from_slice(&self.addr.to_le_bytes());
        b
    }

    /// Decodes and validates a peer's private data (extra trailing bytes, which the CM may
    /// pad with zeros, are ignored).
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        let bad = |m: &str| MetaError(m.to_string());
        if b.len() < Self::LEN {
            return Err(bad(
                "connection private data too short (not a dpu-offload peer?)",
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC {
            return Err(bad("bad magic in private data (not a dpu-offload peer?)"));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(MetaError(format!(
                "peer speaks RDMA link version {version}, we speak {VERSION}"
            )));
        }
        let info = RingInfo {
            slots: u16::from_le_bytes([b[6], b[7]]) as u32,
            slot_size: u32_at(8),
            ctrl: u32_at(12),
            rkey: u32_at(16),
            addr: u64::from_le_bytes([b[20], b[21], b[22], b[23], b[24], b[25], b[26], b[27]]),
        };
        if !(1..=MAX_SLOTS).contains(&info.slots)
            || !(1..=MAX_SLOTS).contains(&info.ctrl)
            || info.slot_size == 0
            || info.slot_size > MAX_SLOT_SIZE
        {
            return Err(MetaError(format!("unusable ring geometry {info:?}")));
        }
        Ok(info)
    }
}

/// Immediate data: `[ctrl polled mod 256 | slots released mod 256 | len-1 or flags]`.
pub fn imm_encode(ctrl_polled: u32, released: u32, low: u32) -> u32 {
    ((ctrl_polled & 0xff) << 24) | ((released & 0xff) << 16) | (low & 0xffff)
}

/// The fields of received immediate data: (ctrl polled mod 256, released mod 256, low 16 bits).
pub fn imm_decode(imm: u32) -> (u32, u32, u32) {
    (imm >> 24, (imm >> 16) & 0xff, imm & 0xffff)
}

/// Advances a full counter from an 8-bit cumulative report (outstanding counts are < 256).
pub fn advance(full: &mut u32, reported: u32) {
    let delta = (reported.wrapping_sub(*full)) & 0xff;
    *full = full.wrapping_add(delta);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_info_roundtrip_and_validation() {
        let r = RingInfo {
            addr: 0x1234_5678_9abc,
            rkey: 77,
            slots: 32,
            slot_size: 32 * 1024,
            ctrl: 8,
        };
        let b = r.encode();
        assert_eq!(RingInfo::decode(&b), Ok(r));
        assert!(RingInfo::decode(&b[..10]).is_err());
        let mut bad = b;
        bad[0] ^= 1;
        assert!(RingInfo::decode(&bad).is_err());
        let mut huge = r;
        huge.slot_size = 1 << 20;
        assert!(RingInfo::decode(&huge.encode()).is_err());
    }

    #[test]
    fn counters_advance_across_wrap() {
        let mut full = 250u32;
        advance(&mut full, 4); // 250 -> 260 (mod 256 = 4)
        assert_eq!(full, 260);
        advance(&mut full, 4);
        assert_eq!(full, 260);
        let mut w = u32::MAX - 1;
        advance(&mut w, 3);
        assert_eq!(w, 3u32.wrapping_add(0));
        let imm = imm_encode(0x1ff, 0x2fe, 0xffff);
        assert_eq!(imm_decode(imm), (0xff, 0xfe, 0xffff));
    }
}
