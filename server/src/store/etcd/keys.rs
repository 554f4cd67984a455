//! The etcd store's key layout under its prefix (`docs/etcd.md`), the [`Meta`] value of a
//! service's `meta` key, and decoding what etcd holds back into checked records.

use std::collections::BTreeMap;

use dlb::{model, proto};
use prost::Message;

use crate::Error;

/// The value of `<prefix>/svc/<service>/meta`: the service's policy, and the parts of the
/// revision's [`Change`](crate::store::Change) that its record keys do not say.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Meta {
    /// The service's policy after the write.
    #[prost(message, optional, tag = "1")]
    pub(super) policy: Option<proto::Policy>,
    /// The service's version before the write (0: the write created it).
    #[prost(uint64, tag = "2")]
    pub(super) base: u64,
    /// Whether the write set the policy (or created the service).
    #[prost(bool, tag = "3")]
    pub(super) policy_changed: bool,
    /// Ids among the written records that did not exist before.
    #[prost(string, repeated, tag = "4")]
    pub(super) created: Vec<String>,
    /// Why removed records were removed, by id.
    #[prost(btree_map = "string, string", tag = "5")]
    pub(super) removal_reasons: BTreeMap<String, String>,
}

/// What a key under `<prefix>/svc/` names.
pub(super) enum Entry<'a> {
    Meta,
    Server(&'a str),
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn epoch(&self) -> String {
        format!("{}/epoch", self.prefix)
    }
    pub(super) fn services(&self) -> String {
        format!("{}/services", self.prefix)
    }
    pub(super) fn root(&self) -> String {
        format!("{}/svc/", self.prefix)
    }
    pub(super) fn service(&self, service: &str) -> String {
        format!("{}/svc/{service}/", self.prefix)
    }
    pub(super) fn meta(&self, service: &str) -> String {
        format!("{}/svc/{service}/meta", self.prefix)
    }
    pub(super) fn server(&self, service: &str, id: &str) -> String {
        format!("{}/svc/{service}/srv/{id}", self.prefix)
    }

    /// The service and entry a key under [`Keys::root`] names (service names and ids have no
    /// `/`, so the split is unambiguous).
    pub(super) fn parse<'a>(&self, key: &'a [u8]) -> Option<(&'a str, Entry<'a>)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/svc/")?;
        let (service, entry) = rest.split_once('/')?;
        let entry = match entry {
            "meta" => Entry::Meta,
            e => Entry::Server(e.strip_prefix("srv/")?),
        };
        Some((service, entry))
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end` for a prefix).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(super) fn corrupt(key: &[u8], what: impl std::fmt::Display) -> Error {
    Error::Storage(format!(
        "etcd key {:?}: {what}",
        dlb::model::prefix(&String::from_utf8_lossy(key), 256)
    ))
}

/// An etcd revision as a version (etcd revisions are never negative).
pub(super) fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The revision a response was served at.
pub(super) fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, Error> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::Storage("etcd: a response without a header".into()))
}

/// Decodes a stored record and checks it against its key.
pub(super) fn decode_server(key: &[u8], id: &str, value: &[u8]) -> Result<proto::Server, Error> {
    let record = proto::Server::decode(value).map_err(|e| corrupt(key, e))?;
    if record.server_id != id {
        return Err(corrupt(key, format!("record names {:?}", record.server_id)));
    }
    model::validate_server(&record).map_err(|e| corrupt(key, e))?;
    Ok(record)
}

pub(super) fn decode_meta(key: &[u8], value: &[u8]) -> Result<(Meta, proto::Policy), Error> {
    let meta = Meta::decode(value).map_err(|e| corrupt(key, e))?;
    let policy = meta
        .policy
        .clone()
        .ok_or_else(|| corrupt(key, "no policy"))?;
    model::validate_policy(&policy).map_err(|e| corrupt(key, e))?;
    Ok((meta, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/dlb/svc/"), b"/dlb/svc0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn keys_parse_back() {
        let k = Keys {
            prefix: "/dlb".into(),
        };
        assert!(matches!(
            k.parse(k.meta("s").as_bytes()),
            Some(("s", Entry::Meta))
        ));
        assert!(matches!(
            k.parse(k.server("s", "a.b:1").as_bytes()),
            Some(("s", Entry::Server("a.b:1")))
        ));
        assert!(k.parse(b"/dlb/svc/s/other").is_none());
        assert!(k.parse(b"/other/svc/s/meta").is_none());
        assert!(k.parse(k.epoch().as_bytes()).is_none());
    }
}
