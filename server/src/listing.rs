//! Bounded listings: the one place that decides how many entries of a listing answer fit in its
//! byte budget. Every listing RPC (ListServices, GetHealth, GetLocalityPlan, ListXdsClients,
//! ListLeases, ListDns, and the circuit reports of ListServers) keeps the first entries, in the
//! listing's order, that fit in [`MAX_LIST_BYTES`](dlb::model::MAX_LIST_BYTES) with the rest of its response, and
//! reports whether entries were left out (`truncated`) and how many exist (`total`): a listing
//! never fails on the message size, whatever clients or operators created.

use dlb::model::MAX_LIST_BYTES;

/// Bytes one entry takes beyond its own encoding, at most: its field key (≤ 3 bytes for field
/// numbers below 2^14) and its length prefix (≤ 5 bytes).
const ENTRY_OVERHEAD: usize = 8;
/// Bytes the `truncated` and `total` fields take, at most (keys of ≤ 2 bytes, a 1-byte bool, a
/// ≤ 5-byte varint).
const COUNT_FIELDS: usize = 16;

/// The entries of a listing that fit, and how many exist.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Listing<T> {
    /// The first entries, in the order given, that fit.
    pub items: Vec<T>,
    /// Whether entries were left out.
    pub truncated: bool,
    /// How many entries exist (saturating at `u32::MAX`).
    pub total: u32,
}

/// The first of `items` (of which there are `total`) that fit in a listing answer whose other
/// fields take `fixed` bytes: the whole answer, `truncated` and `total` included, encodes to at
/// most [`MAX_LIST_BYTES`].
pub(crate) fn first_that_fit<T: prost::Message>(
    total: usize,
    items: impl IntoIterator<Item = T>,
    fixed: usize,
) -> Listing<T> {
    first_within(
        total,
        items,
        MAX_LIST_BYTES.saturating_sub(fixed + COUNT_FIELDS),
    )
}

/// The first of `items` (of which there are `total`) whose encodings, each with its field key
/// and length prefix, add up to at most `room` bytes. Stops at the first entry that does not
/// fit (never skips one), so what is listed is always a prefix of the listing's order.
pub(crate) fn first_within<T: prost::Message>(
    total: usize,
    items: impl IntoIterator<Item = T>,
    room: usize,
) -> Listing<T> {
    let mut bytes = 0;
    let mut out = Vec::new();
    for item in items {
        let len = item.encoded_len() + ENTRY_OVERHEAD;
        if bytes + len > room {
            break;
        }
        bytes += len;
        out.push(item);
    }
    Listing {
        truncated: out.len() < total,
        total: u32::try_from(total).unwrap_or(u32::MAX),
        items: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlb::proto::LeaseInfo;

    fn lease(i: usize) -> LeaseInfo {
        LeaseInfo {
            server_id: format!("{i:0>100}"),
            ttl_seconds: 60,
            remaining_ms: 1,
        }
    }

    #[test]
    fn keeps_the_first_that_fit_and_counts_all() {
        let all: Vec<_> = (0..10).map(lease).collect();
        let one = prost::Message::encoded_len(&all[0]) + ENTRY_OVERHEAD;
        let l = first_within(all.len(), all.clone(), one * 3 + one / 2);
        assert_eq!(l.items, all[..3]);
        assert!(l.truncated);
        assert_eq!(l.total, 10);
        let l = first_within(all.len(), all.clone(), one * 10);
        assert_eq!(l.items, all);
        assert!(!l.truncated);
    }

    #[test]
    fn the_whole_answer_stays_within_the_budget() {
        let n = MAX_LIST_BYTES / 100;
        let r = dlb::proto::ListLeasesResponse {
            service: "s".repeat(128),
            ..Default::default()
        };
        let l = first_that_fit(n, (0..n).map(lease), prost::Message::encoded_len(&r));
        assert!(l.truncated && !l.items.is_empty());
        let r = dlb::proto::ListLeasesResponse {
            leases: l.items,
            truncated: true,
            total: u32::MAX,
            ..r
        };
        assert!(prost::Message::encoded_len(&r) <= MAX_LIST_BYTES);
    }
}
