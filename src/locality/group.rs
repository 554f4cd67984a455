//! Groups of a service's backends: by (priority, zone) for the algorithms that route by zone,
//! by priority only for the hashing ones (Maglev, ring hash). Owns [`ZoneKey`], [`GroupKey`],
//! [`Groups`] and [`group`].

use crate::proto;

/// A zone: (region, zone) of a locality. `sub_zone` is carried and shown, never routed on.
/// Ordered by region, then zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ZoneKey {
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Zone within the region (may be empty for a region-only locality).
    pub zone: String,
}

impl ZoneKey {
    /// The zone of a locality; `None` for no locality or one with neither region nor zone.
    pub fn of(locality: Option<&proto::Locality>) -> Option<ZoneKey> {
        let l = locality?;
        if l.region.is_empty() && l.zone.is_empty() {
            return None;
        }
        Some(ZoneKey::from(l))
    }
}

impl From<&proto::Locality> for ZoneKey {
    fn from(l: &proto::Locality) -> Self {
        ZoneKey {
            region: l.region.clone(),
            zone: l.zone.clone(),
        }
    }
}

impl std::fmt::Display for ZoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.region, self.zone)
    }
}

/// The key of a group: a priority and, when grouping by zone, a zone (`None`: the backends of
/// that priority without a zone, never any client's local zone). Ordered by priority, then zone
/// (no zone first).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    /// Failover priority, 0 = primary.
    pub priority: u32,
    /// Zone, `None` for no zone or when grouping by priority only.
    pub zone: Option<ZoneKey>,
}

/// A service's groups: their keys in (priority, zone) order and each server's group index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Groups {
    /// The key of each group; group `g` is `keys[g]`. Sorted, distinct.
    pub keys: Vec<GroupKey>,
    /// The group of each server, in the order the servers were given.
    pub of_server: Vec<u16>,
}

impl Groups {
    /// Number of groups.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no group (no server).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Groups servers given as (priority, locality): dense indices in (priority, zone) order.
/// `by_zone = false` groups by priority only (Maglev, ring hash). O(n log n). A service has at
/// most [`MAX_BACKENDS`](crate::balance::MAX_BACKENDS) = `u16::MAX` servers, so indices fit a
/// `u16`; past that, the surplus groups share the last index.
pub fn group<'a>(
    servers: impl Iterator<Item = (u32, Option<&'a proto::Locality>)>,
    by_zone: bool,
) -> Groups {
    let keys_of: Vec<GroupKey> = servers
        .map(|(priority, l)| GroupKey {
            priority,
            zone: if by_zone { ZoneKey::of(l) } else { None },
        })
        .collect();
    let mut keys = keys_of.clone();
    keys.sort();
    keys.dedup();
    keys.truncate(usize::from(u16::MAX) + 1);
    let last = keys.len().saturating_sub(1);
    let of_server = keys_of
        .iter()
        .map(|k| {
            let i = keys.binary_search(k).unwrap_or(last);
            u16::try_from(i).unwrap_or(u16::MAX)
        })
        .collect();
    Groups { keys, of_server }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(region: &str, zone: &str) -> proto::Locality {
        proto::Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: "rack".into(),
        }
    }

    #[test]
    fn groups_are_dense_and_ordered() {
        let (a, b) = (loc("eu", "b"), loc("eu", "a"));
        let empty = proto::Locality::default();
        let servers = [
            (1, Some(&a)),
            (0, Some(&a)),
            (0, None),
            (0, Some(&b)),
            (0, Some(&empty)),
            (1, Some(&a)),
        ];
        let g = group(servers.iter().copied(), true);
        let z = |r: &str, z: &str| {
            Some(ZoneKey {
                region: r.into(),
                zone: z.into(),
            })
        };
        assert_eq!(
            g.keys,
            vec![
                GroupKey {
                    priority: 0,
                    zone: None
                },
                GroupKey {
                    priority: 0,
                    zone: z("eu", "a")
                },
                GroupKey {
                    priority: 0,
                    zone: z("eu", "b")
                },
                GroupKey {
                    priority: 1,
                    zone: z("eu", "b")
                },
            ]
        );
        assert_eq!(g.of_server, vec![3, 2, 0, 1, 0, 3]);
        let g = group(servers.iter().copied(), false);
        assert_eq!(g.len(), 2);
        assert_eq!(g.of_server, vec![1, 0, 0, 0, 0, 1]);
        assert!(group(std::iter::empty(), true).is_empty());
    }
}
