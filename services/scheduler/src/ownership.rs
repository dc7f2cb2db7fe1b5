//! Which partitions a replica owns. Pod `scheduler-<i>` of `R` replicas owns partitions `p` with
//! `p % R == i`; ownership is then taken as a lease in the saga store (`saga::Store::acquire`):
//! one owner at a time, an epoch that grows with every change of owner and fences every write.

/// The ordinal of a StatefulSet pod from its hostname (`scheduler-3` → 3).
pub fn ordinal_from_hostname(hostname: &str) -> Option<u32> {
    hostname.rsplit_once('-')?.1.parse().ok()
}

/// The partitions replica `ordinal` of `replicas` owns.
pub fn owned_partitions(ordinal: u32, replicas: u32, partitions: u32) -> Vec<u32> {
    let replicas = replicas.max(1);
    (0..partitions)
        .filter(|p| p % replicas == ordinal)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_partitions() {
        assert_eq!(ordinal_from_hostname("scheduler-0"), Some(0));
        assert_eq!(ordinal_from_hostname("my-scheduler-12"), Some(12));
        assert_eq!(ordinal_from_hostname("scheduler"), None);
        assert_eq!(owned_partitions(1, 3, 8), vec![1, 4, 7]);
        assert_eq!(owned_partitions(0, 1, 4), vec![0, 1, 2, 3]);
        // Every partition has exactly one owner.
        let mut all: Vec<u32> = (0..3).flat_map(|i| owned_partitions(i, 3, 8)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }
}
