//! The stable hash functions every DLB implementation must share.
//!
//! Consistent hashing only works across processes (and across SDKs written in other languages)
//! if every one of them maps a key to a backend identically. This module owns that
//! specification; everything here is a pure function of its bytes, built on **XXH3-64**
//! (the 64-bit `XXH3_64bits` / `XXH3_64bits_withSeed` of the reference xxHash library). Each
//! function is O(length of its input). The table and ring construction built on these hashes
//! is specified in the `maglev` and `ring` module docs.
//!
//! * request key → `key_hash(key) = XXH3_64(key, seed 0)`;
//! * Maglev permutation of a backend with hash key `k` (UTF-8 bytes):
//!   `offset = XXH3_64(k, seed 0x4d41474c45564f46) mod M`,
//!   `skip = XXH3_64(k, seed 0x4d41474c4556534b) mod (M − 1) + 1`;
//! * ring-hash point `r` (0-based) of a backend: `XXH3_64(k ++ "#" ++ decimal(r), seed 0)`;
//! * reducing a 64-bit hash `h` to `[0, m)`: `(h × m) >> 64` computed in 128 bits (Lemire's
//!   multiply-shift "fast range": uniform, and no division on the request path);
//! * backend order (used wherever a tie or an iteration order matters): ascending by
//!   `XXH3_64(k, seed 0)`, then by the bytes of `k`, then by id.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Seed of the Maglev `offset` hash ("MAGLEVOF" in ASCII).
pub const MAGLEV_OFFSET_SEED: u64 = 0x4d41_474c_4556_4f46;
/// Seed of the Maglev `skip` hash ("MAGLEVSK" in ASCII).
pub const MAGLEV_SKIP_SEED: u64 = 0x4d41_474c_4556_534b;

/// Hash of a request key: `XXH3_64(key, seed 0)`.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Hash of a backend's hash key, used to order backends deterministically.
#[inline]
pub fn backend_hash(hash_key: &str) -> u64 {
    xxh3_64(hash_key.as_bytes())
}

/// Maps a 64-bit hash uniformly onto `[0, m)` as `(h × m) >> 64`.
#[inline]
pub fn reduce(h: u64, m: u64) -> u64 {
    ((u128::from(h) * u128::from(m)) >> 64) as u64
}

/// The Maglev `(offset, skip)` of a backend hash key for a table of prime size `m` (≥ 2).
pub fn maglev_permutation(hash_key: &str, m: u64) -> (u64, u64) {
    let k = hash_key.as_bytes();
    let offset = xxh3_64_with_seed(k, MAGLEV_OFFSET_SEED) % m;
    let skip = xxh3_64_with_seed(k, MAGLEV_SKIP_SEED) % (m - 1) + 1;
    (offset, skip)
}

/// The ring position of virtual node `replica` of a backend: `XXH3_64(k ++ "#" ++ decimal(r))`.
/// `buf` is scratch space reused across calls.
pub fn ring_point(hash_key: &str, replica: u32, buf: &mut Vec<u8>) -> u64 {
    use std::io::Write as _;
    buf.clear();
    buf.extend_from_slice(hash_key.as_bytes());
    buf.push(b'#');
    // Writing to a Vec cannot fail.
    let _ = write!(buf, "{replica}");
    xxh3_64(buf)
}

/// A random request key hash, for picks without a key.
#[inline]
pub fn random_hash() -> u64 {
    fastrand::u64(..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_is_in_range() {
        for m in [1u64, 2, 7, 65_537, 1_000_003] {
            for h in [0u64, 1, u64::MAX / 3, u64::MAX] {
                assert!(reduce(h, m) < m);
            }
        }
    }

    #[test]
    fn ring_point_is_hash_of_concatenation() {
        let mut buf = Vec::new();
        assert_eq!(ring_point("b1", 12, &mut buf), xxh3_64(b"b1#12"));
    }

    #[test]
    fn permutation_skip_nonzero() {
        for k in ["a", "b", "backend-17"] {
            let (o, s) = maglev_permutation(k, 65_537);
            assert!(o < 65_537);
            assert!((1..65_537).contains(&s));
        }
    }
}
