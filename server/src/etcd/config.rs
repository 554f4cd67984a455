//! Where and how `dlbd` reaches etcd: [`EtcdConfig`] and its TLS settings. Plain data, present
//! with or without the `etcd` feature, so a configuration naming etcd gets a clear error from a
//! build without it.

/// Where the etcd store keeps its state. Plain data, present with or without the `etcd`
/// feature, so a configuration naming etcd gets a clear error from a build without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints, `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix of this deployment's state (default [`EtcdConfig::DEFAULT_PREFIX`]).
    pub prefix: String,
    /// Per-request deadline.
    pub timeout: std::time::Duration,
    /// After each write, compact etcd so that this many revisions stay (`None`, the default:
    /// leave compaction to etcd's `--auto-compaction-*`). Compaction is cluster-wide, so this
    /// is for tests and single-tenant clusters.
    pub history: Option<u64>,
    /// TLS towards etcd (`None`: plaintext). With it, `host:port` endpoints are reached over
    /// `https`, and the certificate of each member must chain to the CA and name the host.
    pub tls: Option<EtcdTls>,
}

/// TLS settings of the connections to etcd (as etcd's `--trusted-ca-file` and, with
/// `--client-cert-auth`, a client certificate).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificates (PEM) that the members' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// This replica's certificate chain and private key (PEM), for an etcd that requires
    /// client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl EtcdConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "/dlb";

    /// These endpoints, the default prefix, a 10 s deadline, no compaction by DLB.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            timeout: std::time::Duration::from_secs(10),
            history: None,
            tls: None,
        }
    }
}
