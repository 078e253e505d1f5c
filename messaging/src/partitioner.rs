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

    /// Computed with `Utils.toPositive(Utils.murmur2(key)) % 4` from kafka-clients 4.1.1 (the
    /// same keys the end-to-end test `records_keyed_by_order_id_land_where_a_java_client_puts_them`
    /// sends through a producer), and keys of every tail length.
    #[test]
    fn keys_land_where_a_java_client_puts_them() {
        let java_partitions = [
            ("7f1d2c3b-4a5e-4f60-8a71-9b0c1d2e3f40", 3),
            ("00000000-0000-4000-8000-000000000001", 2),
            ("0b6f9a52-1c1e-4d0e-9b7a-2a7c5e0d9f11", 3),
            ("e8a4c1d2-3b4c-4d5e-8f60-718293a4b5c6", 0),
            ("5c1e7b2a-9d3f-4e6a-b1c2-d3e4f5a6b7c8", 1),
            ("91d2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b", 3),
        ];
        for (key, expected) in java_partitions {
            assert_eq!(partition_of(key_hash(key.as_bytes()), 4), expected, "{key}");
        }
        // Kafka's own vectors (UtilsTest.testMurmur2 in kafka-clients), signed as Java's
        // murmur2 returns them; the hash is their toPositive.
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
