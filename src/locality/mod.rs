//! Locality and priority: where a backend or a client runs, and the failover priority of a
//! backend (docs/locality.md).
//!
//! This module owns the domain rules of the `Locality` message and of `Server.priority`: their
//! validation (the one check every entry point calls, through `model::validate_backend`
//! and `model::validate_update`) and the normal form an empty locality takes (none).
//! Its submodules own the service's locality policy ([`policy`]), the grouping of backends by
//! priority and zone ([`group`]) and the routing plan over them ([`plan`]).

pub mod group;
pub mod plan;
#[cfg(test)]
mod plan_tests;
pub mod policy;

pub use group::{group, GroupKey, Groups, ZoneKey};
pub use plan::{plan, BackendState, Plan, Spill};
pub use policy::{config, validate_locality_policy, LocalityConfig};

use crate::proto;
use crate::validation::{validate_id, ValidationError};

/// Highest failover priority a backend may have (priorities are 0..=7, 0 = primary).
pub const MAX_PRIORITY: u32 = 7;

/// Checks a failover priority: 0..=[`MAX_PRIORITY`].
pub fn validate_priority(field: &str, value: u32) -> Result<(), ValidationError> {
    if value > MAX_PRIORITY {
        return Err(ValidationError::new(
            field,
            value,
            format!("must be between 0 and {MAX_PRIORITY}"),
        ));
    }
    Ok(())
}

/// Checks a locality: each part empty or an identifier (1..=128 bytes of `[A-Za-z0-9._:-]`),
/// a zone only under a region and a sub-zone only under a zone. `field` names the message
/// (`locality`); errors name the part (`locality.zone`).
pub fn validate_locality(field: &str, locality: &proto::Locality) -> Result<(), ValidationError> {
    for (part, value) in [
        ("region", &locality.region),
        ("zone", &locality.zone),
        ("sub_zone", &locality.sub_zone),
    ] {
        if !value.is_empty() {
            validate_id(&format!("{field}.{part}"), value)?;
        }
    }
    if locality.region.is_empty() && !locality.zone.is_empty() {
        return Err(ValidationError::new(
            format!("{field}.region"),
            "",
            "must be set when a zone is",
        ));
    }
    if locality.zone.is_empty() && !locality.sub_zone.is_empty() {
        return Err(ValidationError::new(
            format!("{field}.zone"),
            "",
            "must be set when a sub_zone is",
        ));
    }
    Ok(())
}

/// The stored form of a locality: `None` for an unset or all-empty one, so that "no locality"
/// has one representation (and a record written with an empty locality equals one written
/// without).
pub fn normalize(locality: Option<proto::Locality>) -> Option<proto::Locality> {
    locality.filter(|l| !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(region: &str, zone: &str, sub_zone: &str) -> proto::Locality {
        proto::Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: sub_zone.into(),
        }
    }

    #[test]
    fn localities() {
        assert!(validate_locality("locality", &loc("", "", "")).is_ok());
        assert!(validate_locality("locality", &loc("eu", "eu-a", "rack-1")).is_ok());
        assert!(validate_locality("locality", &loc("eu", "", "")).is_ok());
        let e = validate_locality("locality", &loc("eu", "a b", "")).unwrap_err();
        assert_eq!(e.field, "locality.zone");
        let e = validate_locality("locality", &loc("", "eu-a", "")).unwrap_err();
        assert_eq!(e.field, "locality.region");
        let e = validate_locality("locality", &loc("eu", "", "r1")).unwrap_err();
        assert_eq!(e.field, "locality.zone");
        let e = validate_locality("locality", &loc(&"r".repeat(129), "", "")).unwrap_err();
        assert_eq!(e.field, "locality.region");
    }

    #[test]
    fn priorities_and_normal_form() {
        assert!(validate_priority("priority", 0).is_ok());
        assert!(validate_priority("priority", MAX_PRIORITY).is_ok());
        assert_eq!(
            validate_priority("priority", MAX_PRIORITY + 1)
                .unwrap_err()
                .field,
            "priority"
        );
        assert_eq!(normalize(Some(loc("", "", ""))), None);
        assert_eq!(normalize(None), None);
        assert_eq!(normalize(Some(loc("eu", "", ""))), Some(loc("eu", "", "")));
    }
}
