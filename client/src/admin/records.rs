//! The backends written by the admin calls: [`NewServer`] (`AddServer`) and [`ServerUpdate`]
//! (`UpdateServer`), with their builders and the local pre-check the server applies too.

use std::collections::HashMap;

use dlb::model;
use dlb::proto;

use crate::error::Result;

/// A backend to register with [`super::AdminClient::add_server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewServer {
    /// Unique id within the service.
    pub server_id: String,
    /// `host:port`.
    pub address: String,
    /// Relative share, 1..=10000.
    pub weight: u32,
    /// Stable consistent-hashing key; empty means "use the server id".
    pub hash_key: String,
    /// Free-form labels.
    pub metadata: HashMap<String, String>,
    /// Where the backend runs (`None`: no locality; docs/locality.md).
    pub locality: Option<proto::Locality>,
    /// Failover priority, 0..=7 (0 = primary).
    pub priority: u32,
}

impl NewServer {
    /// A backend with weight 1, no hash key, no labels, no locality, priority 0.
    pub fn new(server_id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            address: address.into(),
            weight: 1,
            hash_key: String::new(),
            metadata: HashMap::new(),
            locality: None,
            priority: 0,
        }
    }

    /// Sets where the backend runs (see [`crate::locality`] to build one).
    pub fn locality(mut self, locality: proto::Locality) -> Self {
        self.locality = Some(locality);
        self
    }

    /// Sets the failover priority (0 = primary, at most 7).
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the stable hash key.
    pub fn hash_key(mut self, key: impl Into<String>) -> Self {
        self.hash_key = key.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Checks every field with [`model::validate_backend`], the check the server applies (a
    /// weight of 0 is refused here: set it, or keep the default 1).
    pub fn validate(&self) -> Result<()> {
        model::validate_backend(&self.record())?;
        Ok(())
    }

    /// The backend as a record (its operator-given fields).
    pub(super) fn record(&self) -> proto::Server {
        proto::Server {
            server_id: self.server_id.clone(),
            address: self.address.clone(),
            weight: self.weight,
            hash_key: self.hash_key.clone(),
            metadata: self.metadata.clone(),
            locality: self.locality.clone(),
            priority: self.priority,
            ..Default::default()
        }
    }
}

/// A change to an existing backend for [`super::AdminClient::update_server`]: only the fields that are
/// `Some` change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerUpdate {
    /// The backend to change.
    pub server_id: String,
    /// New weight, 1..=10000.
    pub weight: Option<u32>,
    /// New drain flag.
    pub draining: Option<bool>,
    /// New address.
    pub address: Option<String>,
    /// New hash key (empty resets it to the server id).
    pub hash_key: Option<String>,
    /// New labels, replacing the old ones.
    pub metadata: Option<HashMap<String, String>>,
    /// New locality, replacing the whole old one (an all-empty one clears it).
    pub locality: Option<proto::Locality>,
    /// New failover priority, 0..=7.
    pub priority: Option<u32>,
    /// Compare-and-set: apply only if the service is at this version (`FailedPrecondition`
    /// naming the current version otherwise).
    pub expected_version: Option<u64>,
}

impl ServerUpdate {
    /// An update of `server_id` that changes nothing yet.
    pub fn new(server_id: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            ..Self::default()
        }
    }

    /// Sets a new locality (an all-empty one clears it).
    pub fn locality(mut self, locality: proto::Locality) -> Self {
        self.locality = Some(locality);
        self
    }

    /// Sets a new failover priority (0 = primary, at most 7).
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Checks every set field with [`model::validate_update`], the check the server applies.
    pub fn validate(&self) -> Result<()> {
        model::validate_update(&self.clone().request(String::new()))?;
        Ok(())
    }

    /// The `UpdateServer` request for `service`.
    pub(super) fn request(self, service: String) -> proto::UpdateServerRequest {
        proto::UpdateServerRequest {
            service,
            server_id: self.server_id,
            weight: self.weight,
            draining: self.draining,
            address: self.address,
            hash_key: self.hash_key,
            replace_metadata: self.metadata.is_some(),
            metadata: self.metadata.unwrap_or_default(),
            expected_version: self.expected_version,
            locality: self.locality,
            priority: self.priority,
        }
    }
}
