//! The zone demand the control plane pushes in `GlobalLoad.zone_demand`: the share of a
//! service's calls made by SDK clients of each (region, zone), the same numbers for every SDK.
//!
//! The session task keeps the last one per followed service ([`super::entry::Entry`]) for the
//! picker's locality plan. A push is input from the network: [`sanitize`] keeps at most
//! [`MAX_ZONES`] entries that name a zone and carry a finite share in 0..=1; shares are kept as
//! sent (the control plane sends them summing to 1). An empty list means "not known".

use dlb::proto;

/// Most zone entries kept from one push (the control plane sends at most 64 per service).
pub(crate) const MAX_ZONES: usize = 1024;

/// The usable entries of a push's zone demand (see the module docs).
pub(crate) fn sanitize(pushed: &[proto::ZoneDemand]) -> Vec<proto::ZoneDemand> {
    pushed
        .iter()
        .filter(|d| {
            d.locality
                .as_ref()
                .is_some_and(|l| !(l.region.is_empty() && l.zone.is_empty()))
                && d.share.is_finite()
                && (0.0..=1.0).contains(&d.share)
        })
        .take(MAX_ZONES)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(zone: &str, share: f64) -> proto::ZoneDemand {
        proto::ZoneDemand {
            locality: Some(proto::Locality {
                region: "eu".into(),
                zone: zone.into(),
                sub_zone: String::new(),
            }),
            share,
        }
    }

    #[test]
    fn bad_entries_are_dropped_and_the_list_is_bounded() {
        let pushed = vec![
            d("a", 0.25),
            d("b", f64::NAN),
            d("c", -0.1),
            d("d", 1.5),
            proto::ZoneDemand {
                locality: None,
                share: 0.5,
            },
            proto::ZoneDemand {
                locality: Some(Default::default()),
                share: 0.5,
            },
            d("e", 0.75),
        ];
        assert_eq!(sanitize(&pushed), vec![d("a", 0.25), d("e", 0.75)]);
        let many: Vec<_> = (0..MAX_ZONES + 10)
            .map(|i| d(&format!("z{i}"), 0.0))
            .collect();
        assert_eq!(sanitize(&many).len(), MAX_ZONES);
    }
}
