//! The partition a key lands on, as the producers pick it ([`crate::kafka::PARTITIONER`]:
//! Java's default, `Utils.toPositive(Utils.murmur2(key)) % partitions`), computed without a
//! producer, so that work done outside the consume loop (the orchestrator's deadline scanner)
//! can be shared between instances by the partitions their consumers hold.

/// Java's `Utils.toPositive(Utils.murmur2(key))` (kafka-clients): the key's hash, from which
/// the partition is the remainder by the topic's partition count ([`partition_of`]). Kept
/// beside a row, it gives the partition for any partition count.
pub fn key_hash(key: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java's int length; a key longer than 2 GiB cannot be a Kafka key.
    let length = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let mut h = SEED ^ length;
    let mut chunks = key.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if let Some(&byte) = tail.get(2) {
            h ^= u32::from(byte) << 16;
        }
        if let Some(&byte) = tail.get(1) {
            h ^= u32::from(byte) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    // toPositive: the sign bit cleared, so the value fits an i32 and is never negative.
    i32::try_from(h & 0x7fff_ffff).unwrap_or_default()
}

/// The partition of a key whose [`key_hash`] is `hash` on a topic of `partitions` partitions.
/// `partitions` below 1 (no topic has none) is taken as 1.
pub fn partition_of(hash: i32, partitions: i32) -> i32 {
    hash.rem_euclid(partitions.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own vectors (`UtilsTest.testMurmur2` in kafka-clients), signed as Java's murmur2
    /// returns them; the hash is their toPositive. (The end-to-end test
    /// `records_keyed_by_order_id_land_where_a_java_client_puts_them` checks the partitions
    /// against a producer's.)
    #[test]
    fn keys_hash_as_a_java_client_hashes_them() {
        assert_eq!(key_hash(b"abc"), 479_470_107);
        assert_eq!(key_hash(b"21"), (-973_932_308_i32 & 0x7fff_ffff));
        assert_eq!(key_hash(b"foobar"), (-790_332_482_i32 & 0x7fff_ffff));
        assert_eq!(
            key_hash(b"a-little-bit-long-string"),
            (-985_981_536_i32 & 0x7fff_ffff)
        );
        assert_eq!(
            key_hash(b"a-little-bit-longer-string"),
            (-1_486_304_829_i32 & 0x7fff_ffff)
        );
        assert_eq!(
            key_hash(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            (-58_897_971_i32 & 0x7fff_ffff)
        );
    }

    #[test]
    fn a_partition_is_always_within_the_topic() {
        for hash in [0, 1, 7, i32::MAX] {
            for partitions in [1, 2, 3, 12] {
                let p = partition_of(hash, partitions);
                assert!((0..partitions).contains(&p), "{hash} % {partitions} = {p}");
            }
        }
        assert_eq!(partition_of(5, 0), 0);
    }
}
