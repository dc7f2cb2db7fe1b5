//! The key → partition mapping. It must never change between processes or versions: a booking's
//! reschedule and cancel must land on the partition its request is on. FNV-1a (64-bit) is
//! specified byte for byte, unlike `std`'s `DefaultHasher`.

/// FNV-1a over the UTF-8 bytes of `key`.
pub fn stable_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The partition of `key` among `partitions` (at least 1).
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (stable_hash(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if these change, existing logs would be read with the wrong partitioning.
    #[test]
    fn mapping_is_pinned_across_versions() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash("foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            partition_for("3f2b8e9e-5d7c-4d0e-9a51-1f0c2b7d9e44", 8),
            (stable_hash("3f2b8e9e-5d7c-4d0e-9a51-1f0c2b7d9e44") % 8) as u32
        );
        assert_eq!(partition_for("anything", 0), 0);
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for(&format!("delivery-{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
