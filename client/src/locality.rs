//! The SDK's own locality: where this client runs, sent in the session's first
//! `Subscribe.locality` so that zone-aware routing prefers backends of its zone and its calls
//! count in its zone's demand (docs/locality.md).
//!
//! **Precedence, per part.** A part set in code ([`crate::ClientBuilder::locality`],
//! [`crate::ClientBuilder::locality_value`], [`crate::ClientBuilder::sub_zone`]) wins; a part
//! not set in code is read from its environment variable ([`ENV_REGION`] `DLB_REGION`,
//! [`ENV_ZONE`] `DLB_ZONE`, [`ENV_SUB_ZONE`] `DLB_SUB_ZONE`; empty counts as unset); a part set
//! nowhere is empty. No part set: the client has no zone (no zone preference). The result is
//! checked like a backend's locality ([`dlb::locality::validate_locality`]) when the client is
//! built: a bad value fails [`crate::ClientBuilder::connect`] with `InvalidArgument` naming the
//! builder field or the environment variable it came from.
//!
//! Also the helper [`locality`] that builds a `Locality` value for the admin builders.

use dlb::proto;
use dlb::validation::validate_id;

use crate::error::{Error, Result};

/// Environment variable of the client's region.
pub const ENV_REGION: &str = "DLB_REGION";
/// Environment variable of the client's zone.
pub const ENV_ZONE: &str = "DLB_ZONE";
/// Environment variable of the client's sub-zone.
pub const ENV_SUB_ZONE: &str = "DLB_SUB_ZONE";

/// A locality in `region` / `zone` (no sub-zone), for [`crate::NewServer::locality`],
/// [`crate::Lease::locality`], [`crate::DnsDeclaration::locality`] and
/// [`crate::ClientBuilder::locality_value`].
pub fn locality(region: impl Into<String>, zone: impl Into<String>) -> proto::Locality {
    proto::Locality {
        region: region.into(),
        zone: zone.into(),
        sub_zone: String::new(),
    }
}

impl crate::ClientBuilder {
    /// Where this client runs, for zone-aware routing: `region` and `zone` (sent in the
    /// session's first `Subscribe.locality`). Not set in code: `DLB_REGION` / `DLB_ZONE` from
    /// the environment ([the module docs](self) give the precedence); a bad value fails
    /// [`crate::ClientBuilder::connect`] with `InvalidArgument` naming it.
    pub fn locality(mut self, region: impl Into<String>, zone: impl Into<String>) -> Self {
        self.locality.region = Some(region.into());
        self.locality.zone = Some(zone.into());
        self
    }

    /// The client's sub-zone (rack, cell; shown, not routed on). Not set: `DLB_SUB_ZONE`.
    pub fn sub_zone(mut self, sub_zone: impl Into<String>) -> Self {
        self.locality.sub_zone = Some(sub_zone.into());
        self
    }

    /// The client's whole locality as one value (every part, even empty ones, counts as set
    /// in code, so the environment is not read).
    pub fn locality_value(mut self, value: proto::Locality) -> Self {
        self.locality = LocalitySetting {
            region: Some(value.region),
            zone: Some(value.zone),
            sub_zone: Some(value.sub_zone),
        };
        self
    }
}

/// The parts of the client's locality set in code (`None`: not set, read the environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LocalitySetting {
    pub(crate) region: Option<String>,
    pub(crate) zone: Option<String>,
    pub(crate) sub_zone: Option<String>,
}

impl LocalitySetting {
    /// The client's locality from the code's parts and, for parts not set there, `env`
    /// (see the module docs); `None` when no part is set anywhere.
    pub(crate) fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<proto::Locality>> {
        let mut parts: [(String, &'static str); 3] = Default::default();
        for (i, (code, field, var)) in [
            (&self.region, "locality.region", ENV_REGION),
            (&self.zone, "locality.zone", ENV_ZONE),
            (&self.sub_zone, "locality.sub_zone", ENV_SUB_ZONE),
        ]
        .into_iter()
        .enumerate()
        {
            let (value, source) = match code {
                Some(v) => (v.clone(), field),
                None => (env(var).unwrap_or_default(), var),
            };
            if !value.is_empty() {
                validate_id(source, &value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            }
            parts[i] = (value, source);
        }
        let [(region, _), (zone, zone_from), (sub_zone, sub_zone_from)] = parts;
        if region.is_empty() && !zone.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{zone_from} is {zone:?} but no region is set: set {ENV_REGION} or \
                 ClientBuilder::locality(region, zone)"
            )));
        }
        if zone.is_empty() && !sub_zone.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{sub_zone_from} is {sub_zone:?} but no zone is set: set {ENV_ZONE} or \
                 ClientBuilder::locality(region, zone)"
            )));
        }
        let l = proto::Locality {
            region,
            zone,
            sub_zone,
        };
        dlb::locality::validate_locality("locality", &l)?;
        Ok(dlb::locality::normalize(Some(l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn code(region: Option<&str>, zone: Option<&str>, sub: Option<&str>) -> LocalitySetting {
        LocalitySetting {
            region: region.map(Into::into),
            zone: zone.map(Into::into),
            sub_zone: sub.map(Into::into),
        }
    }

    #[test]
    fn code_wins_per_part_then_the_environment() {
        let none = LocalitySetting::default();
        assert_eq!(none.resolve(env(&[])).unwrap(), None);
        let all_env = [
            ("DLB_REGION", "eu"),
            ("DLB_ZONE", "eu-a"),
            ("DLB_SUB_ZONE", "r1"),
        ];
        let l = none.resolve(env(&all_env)).unwrap().unwrap();
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()),
            ("eu", "eu-a", "r1")
        );
        let l = code(Some("us"), Some("us-1"), None)
            .resolve(env(&all_env))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()),
            ("us", "us-1", "r1")
        );
        // Empty variables are unset.
        assert_eq!(
            none.resolve(env(&[("DLB_REGION", ""), ("DLB_ZONE", "")]))
                .unwrap(),
            None
        );
    }

    #[test]
    fn bad_values_name_their_source() {
        let none = LocalitySetting::default();
        let msg = |r: Result<Option<proto::Locality>>| r.unwrap_err().to_string();
        let m = msg(none.resolve(env(&[("DLB_REGION", "eu"), ("DLB_ZONE", "a b")])));
        assert!(m.contains("DLB_ZONE"), "{m}");
        let m = msg(none.resolve(env(&[("DLB_ZONE", "eu-a")])));
        assert!(m.contains("DLB_ZONE") && m.contains("DLB_REGION"), "{m}");
        let m = msg(code(Some("eu"), Some("a/b"), None).resolve(env(&[])));
        assert!(m.contains("locality.zone"), "{m}");
        let m = msg(none.resolve(env(&[("DLB_REGION", "eu"), ("DLB_SUB_ZONE", "r1")])));
        assert!(m.contains("DLB_SUB_ZONE"), "{m}");
    }
}
