//! Automatic discovery: backends that join and leave without an operator's write.
//!
//! * [`leases`] — self-registration: a backend stays while it keeps its lease alive (one task
//!   owning the deadlines, or leases in etcd expired by the leader);
//! * [`dns`] — services that follow a DNS name (one task per name, refreshed by the leader).
//!
//! Their RPC front-end is `dlb.v1.Membership` (`api::membership`); their metrics are
//! [`MembershipMetrics`].

pub mod dns;
pub mod leases;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Automatic-discovery metrics, registered with the others by the server's `Metrics`.
///
/// | name | type | labels |
/// |---|---|---|
/// | `dlb_lease_registrations_total` | counter | | (leases that created their backend) |
/// | `dlb_lease_expiries_total` | counter | | (backends removed: `lease expired`) |
/// | `dlb_leases` | gauge | | (live leases) |
/// | `dlb_dns_refreshes_total` | counter | `service`, `result` (ok, error) |
/// | `dlb_dns_consecutive_failures` | gauge | `service` (0: the last refresh succeeded) |
/// | `dlb_dns_skipped_addresses_total` | counter | `reason` (unspecified, broadcast, multicast) |
#[derive(Debug, Default, Clone)]
pub struct MembershipMetrics {
    /// Leases that created their backend.
    pub registrations: Counter,
    /// Backends removed because their lease expired.
    pub expiries: Counter,
    /// Live leases.
    pub leases: Gauge,
    dns_refreshes: Family<Labels, Counter>,
    dns_failing: Family<Labels, Gauge>,
    dns_skipped: Family<Labels, Counter>,
}

impl MembershipMetrics {
    /// The metrics, registered in `registry`.
    pub fn registered(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_lease_registrations",
            "Lease registrations that created their backend",
            m.registrations.clone(),
        );
        registry.register(
            "dlb_lease_expiries",
            "Backends removed because their lease expired (reason: lease expired)",
            m.expiries.clone(),
        );
        registry.register("dlb_leases", "Live leases", m.leases.clone());
        registry.register(
            "dlb_dns_refreshes",
            "DNS refreshes by service and result (ok, error)",
            m.dns_refreshes.clone(),
        );
        registry.register(
            "dlb_dns_consecutive_failures",
            "Failed DNS refreshes in a row per service (0: the last one succeeded)",
            m.dns_failing.clone(),
        );
        registry.register(
            "dlb_dns_skipped_addresses",
            "DNS answers never turned into backends, by reason (unspecified, broadcast, multicast)",
            m.dns_skipped.clone(),
        );
        m
    }

    /// Counts one address of a DNS answer set aside for `reason`.
    pub fn dns_skipped(&self, reason: &'static str) {
        self.dns_skipped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Counts one DNS refresh of `service`; a success also clears its failure gauge.
    pub fn dns_refresh(&self, service: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.dns_refreshes
            .get_or_create(&vec![
                ("service".to_owned(), service.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
        if ok {
            self.dns_failures(service, 0);
        }
    }

    /// Sets the consecutive-failure gauge of `service`.
    pub fn dns_failures(&self, service: &str, failures: i64) {
        self.dns_failing
            .get_or_create(&vec![("service".to_owned(), service.to_owned())])
            .set(failures);
    }

    /// Drops the series of a service that no longer follows a name.
    pub fn dns_forget(&self, service: &str) {
        self.dns_failing
            .remove(&vec![("service".to_owned(), service.to_owned())]);
    }
}
