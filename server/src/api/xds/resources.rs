//! The mapping from a DLB service to the three xDS resources a stock gRPC client needs for
//! `xds:///S`: Listener `S`, Cluster `S`, ClusterLoadAssignment `S` (see `docs/xds.md`).
//!
//! * **Listener** `S`: an API listener holding an `HttpConnectionManager` with an inline route
//!   configuration (one virtual host for every domain, one route to cluster `S`) and the router
//!   filter as its only (so last) HTTP filter (gRFC A39). For hashing services the route carries
//!   a hash policy on the request header [`HASH_HEADER`].
//! * **Cluster** `S`: type EDS with its EDS config from ADS; the balancing policy both in the
//!   legacy `lb_policy` field and in the `load_balancing_policy` list (gRFC A52: a client takes
//!   the first policy it supports).
//! * **ClusterLoadAssignment** `S`: per client zone, see [`super::assignment`] (every backend
//!   its own locality with its real region and zone, locality weights carrying the locality
//!   plan's shares, priorities for native failover).
//!
//! Health: an eligible backend is `HEALTHY`, a draining one `DRAINING`, an unhealthy one
//! `UNHEALTHY` (stock clients use only HEALTHY and UNKNOWN endpoints, gRFC A27).
//!
//! Every function here is pure and O(backends).

use dlb::proto::{self, Algorithm};
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::load_balancing_policies as lbp;
use envoy_types::pb::google::protobuf::{value, Any, Struct, UInt32Value, Value};
use envoy_types::util::pack_any;

use crate::store::ServiceSnapshot;

/// Type URL of Listener resources (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of Cluster resources (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of ClusterLoadAssignment resources (EDS).
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of RouteConfiguration resources (RDS; DLB inlines routes, so never served).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The request header whose value is the consistent-hashing key of Maglev and ring-hash
/// services (a key keeps its backend). Without the header a stock client hashes randomly.
pub const HASH_HEADER: &str = "dlb-hash-key";

// No ring size is pushed: grpc-js 1.14 NACKs a `RingHash` policy with `minimum_ring_size` set
// ("min_ring_size must be a number"), so clients use their default (1024 minimum, gRFC A42).

/// The resource types DLB serves, with a short name for logs, metrics and `dlbctl`.
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "listener",
        CLUSTER => "cluster",
        ENDPOINTS => "endpoints",
        ROUTE => "route",
        _ => "other",
    }
}

/// Whether DLB serves resources of this type (RDS and anything else: no resources exist).
pub fn served(type_url: &str) -> bool {
    matches!(type_url, LISTENER | CLUSTER | ENDPOINTS)
}

/// The resource of type `type_url` named `snap.name`, packed; `None` for a type DLB does not
/// serve.
pub fn resource(type_url: &str, snap: &ServiceSnapshot) -> Option<Any> {
    match type_url {
        LISTENER => Some(pack_any(listener_for(snap))),
        CLUSTER => Some(pack_any(cluster_for(snap))),
        ENDPOINTS => Some(pack_any(endpoints_for(snap))),
        _ => None,
    }
}

fn hashing(policy: &proto::Policy) -> bool {
    matches!(policy.algorithm(), Algorithm::Maglev | Algorithm::RingHash)
}

/// Listener `S`: API listener → HttpConnectionManager → inline route to cluster `S`.
pub fn listener_for(snap: &ServiceSnapshot) -> listener::Listener {
    let hash_policy = if hashing(&snap.policy) {
        vec![route::route_action::HashPolicy {
            policy_specifier: Some(route::route_action::hash_policy::PolicySpecifier::Header(
                route::route_action::hash_policy::Header {
                    header_name: HASH_HEADER.into(),
                    ..Default::default()
                },
            )),
            terminal: false,
        }]
    } else {
        Vec::new()
    };
    let route_config = route::RouteConfiguration {
        name: snap.name.clone(),
        virtual_hosts: vec![route::VirtualHost {
            name: snap.name.clone(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        snap.name.clone(),
                    )),
                    hash_policy,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = hcm::HttpConnectionManager {
        stat_prefix: snap.name.clone(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: snap.name.clone(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

fn policy(name: &str, config: Any) -> cluster::load_balancing_policy::Policy {
    cluster::load_balancing_policy::Policy {
        typed_extension_config: Some(core::TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(config),
        }),
    }
}

fn wrr_round_robin() -> cluster::load_balancing_policy::Policy {
    policy(
        "envoy.load_balancing_policies.wrr_locality",
        pack_any(lbp::wrr_locality::v3::WrrLocality {
            endpoint_picking_policy: Some(cluster::LoadBalancingPolicy {
                policies: vec![policy(
                    "envoy.load_balancing_policies.round_robin",
                    pack_any(lbp::round_robin::v3::RoundRobin::default()),
                )],
            }),
        }),
    )
}

/// Cluster `S`: EDS over ADS, with the service's algorithm mapped to a policy stock clients
/// accept (see the module docs).
pub fn cluster_for(snap: &ServiceSnapshot) -> cluster::Cluster {
    let ads = core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource::default(),
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    };
    let (lb_policy, lb_config, policies) = match snap.policy.algorithm() {
        Algorithm::Maglev | Algorithm::RingHash => (
            cluster::cluster::LbPolicy::RingHash,
            Some(cluster::cluster::LbConfig::RingHashLbConfig(
                cluster::cluster::RingHashLbConfig {
                    hash_function: cluster::cluster::ring_hash_lb_config::HashFunction::XxHash
                        as i32,
                    ..Default::default()
                },
            )),
            vec![policy(
                "envoy.load_balancing_policies.ring_hash",
                pack_any(lbp::ring_hash::v3::RingHash {
                    hash_function: lbp::ring_hash::v3::ring_hash::HashFunction::XxHash as i32,
                    ..Default::default()
                }),
            )],
        ),
        // Stock gRPC clients have no Peak-EWMA: least request (P2C) is its nearest policy.
        Algorithm::LeastConnExact | Algorithm::LeastConnP2c | Algorithm::PeakEwma => (
            cluster::cluster::LbPolicy::RoundRobin,
            None,
            vec![
                policy(
                    "envoy.load_balancing_policies.least_request",
                    pack_any(lbp::least_request::v3::LeastRequest {
                        choice_count: Some(UInt32Value { value: 2 }),
                        ..Default::default()
                    }),
                ),
                wrr_round_robin(),
            ],
        ),
        Algorithm::RoundRobin | Algorithm::Unspecified => (
            cluster::cluster::LbPolicy::RoundRobin,
            None,
            vec![wrr_round_robin()],
        ),
    };
    cluster::Cluster {
        name: snap.name.clone(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads),
            service_name: snap.name.clone(),
        }),
        lb_policy: lb_policy as i32,
        lb_config,
        load_balancing_policy: Some(cluster::LoadBalancingPolicy { policies }),
        ..Default::default()
    }
}

/// The xDS health of a backend: eligible → HEALTHY, unhealthy → UNHEALTHY, draining (and
/// healthy) → DRAINING.
pub fn health_of(server: &proto::Server) -> core::HealthStatus {
    if server.health() == proto::HealthStatus::Unhealthy {
        core::HealthStatus::Unhealthy
    } else if server.draining {
        core::HealthStatus::Draining
    } else {
        core::HealthStatus::Healthy
    }
}

/// The weight pushed for a backend: its effective weight (0 means "same as weight"), at least 1.
pub fn weight_of(server: &proto::Server) -> u32 {
    let w = if server.effective_weight == 0 {
        server.weight
    } else {
        server.effective_weight
    };
    w.max(1)
}

/// What the service's panic decision does to the health stock clients are told (they use only
/// HEALTHY and UNKNOWN endpoints, gRFC A27), computed exactly as DLB's pickers decide it: in
/// `route_all` panic every endpoint is HEALTHY (every backend gets traffic, as in the SDK); in
/// `fail` panic every endpoint is UNHEALTHY (calls fail `UNAVAILABLE`, as picks fail in the
/// SDK). `None` outside panic: each backend's own health.
pub fn panic_health(snap: &ServiceSnapshot) -> Option<core::HealthStatus> {
    let state = dlb::health_policy::panic_state(&snap.policy, snap.servers.values().map(|s| &**s));
    if !state.active {
        return None;
    }
    match proto::PanicMode::try_from(state.mode) {
        Ok(proto::PanicMode::Fail) => Some(core::HealthStatus::Unhealthy),
        _ => Some(core::HealthStatus::Healthy),
    }
}

/// ClusterLoadAssignment `S` as a client without a zone receives it (see
/// [`super::assignment`] for the layout and the per-zone assignments).
pub fn endpoints_for(snap: &ServiceSnapshot) -> endpoint::ClusterLoadAssignment {
    super::assignment::Assignments::new(std::sync::Arc::new(snap.clone()), None, None).layout(None)
}

/// The endpoint of `server` at `addr`, sent with health `health` (else its own).
pub(crate) fn lb_endpoint(
    server: &proto::Server,
    addr: std::net::SocketAddr,
    health: Option<core::HealthStatus>,
) -> endpoint::LbEndpoint {
    endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: addr.ip().to_string(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                            u32::from(addr.port()),
                        )),
                        ..Default::default()
                    })),
                }),
                hostname: server.server_id.clone(),
                ..Default::default()
            },
        )),
        health_status: health.unwrap_or_else(|| health_of(server)) as i32,
        load_balancing_weight: Some(UInt32Value {
            value: weight_of(server),
        }),
        metadata: Some(hash_key_metadata(server)),
    }
}

/// `envoy.lb` → `hash_key`: the backend's stable hash key (its `hash_key`, else its id). Clients
/// implementing gRFC A76 place the endpoint on the hash ring by it, so a backend that moves to
/// a new address keeps its keys; older clients hash the address.
fn hash_key_metadata(server: &proto::Server) -> core::Metadata {
    let key = if server.hash_key.is_empty() {
        server.server_id.clone()
    } else {
        server.hash_key.clone()
    };
    let value = Value {
        kind: Some(value::Kind::StringValue(key)),
    };
    let mut lb = Struct::default();
    lb.fields.insert("hash_key".into(), value);
    let mut md = core::Metadata::default();
    md.filter_metadata.insert("envoy.lb".into(), lb);
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn snap(algorithm: Algorithm) -> ServiceSnapshot {
        let mut servers = crate::store::Servers::new();
        for (id, addr, weight, health, draining) in [
            ("a", "127.0.0.1:1", 3, proto::HealthStatus::Healthy, false),
            ("b", "127.0.0.1:2", 1, proto::HealthStatus::Unhealthy, false),
            ("c", "127.0.0.1:3", 2, proto::HealthStatus::Healthy, true),
            ("d", "example.com:4", 1, proto::HealthStatus::Healthy, false),
        ] {
            let mut s = proto::Server {
                server_id: id.into(),
                address: addr.into(),
                weight,
                draining,
                ..Default::default()
            };
            s.set_health(health);
            servers.insert(id.into(), Arc::new(s));
        }
        ServiceSnapshot {
            name: "s".into(),
            version: proto::Version {
                epoch: 1,
                version: 7,
            },
            policy: proto::Policy {
                algorithm: algorithm as i32,
                ..dlb::model::default_policy()
            },
            servers,
        }
    }

    #[test]
    fn round_robin_puts_each_backend_in_its_own_weighted_locality() {
        let cla = endpoints_for(&snap(Algorithm::RoundRobin));
        assert_eq!(cla.cluster_name, "s");
        // "d" has a host name: left out.
        assert_eq!(cla.endpoints.len(), 3);
        let weights: Vec<u32> = cla
            .endpoints
            .iter()
            .map(|l| l.load_balancing_weight.as_ref().map_or(0, |w| w.value))
            .collect();
        // Locality weights are shares in millionths: "a" is the only eligible backend; the
        // unhealthy and the draining one keep the minimum weight 1.
        assert_eq!(weights, vec![1_000_000, 1, 1]);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
        let health: Vec<i32> = cla
            .endpoints
            .iter()
            .map(|l| l.lb_endpoints[0].health_status)
            .collect();
        assert_eq!(
            health,
            vec![
                core::HealthStatus::Healthy as i32,
                core::HealthStatus::Unhealthy as i32,
                core::HealthStatus::Draining as i32
            ]
        );
    }

    #[test]
    fn panic_route_all_marks_every_endpoint_healthy_and_fail_every_one_unhealthy() {
        let health = |mode: proto::PanicMode| {
            let mut s = snap(Algorithm::RoundRobin);
            // 2 of 4 backends eligible ("b" is unhealthy, "c" draining) is below 60 %.
            s.policy.panic = Some(proto::PanicPolicy {
                threshold_percent: 60,
                mode: mode as i32,
            });
            endpoints_for(&s)
                .endpoints
                .iter()
                .map(|l| l.lb_endpoints[0].health_status)
                .collect::<Vec<_>>()
        };
        let all = |h: core::HealthStatus| vec![h as i32; 3];
        assert_eq!(
            health(proto::PanicMode::RouteAll),
            all(core::HealthStatus::Healthy)
        );
        assert_eq!(
            health(proto::PanicMode::Fail),
            all(core::HealthStatus::Unhealthy)
        );
        // Above the threshold: each backend's own health.
        let mut s = snap(Algorithm::RoundRobin);
        s.policy.panic = Some(proto::PanicPolicy {
            threshold_percent: 10,
            mode: proto::PanicMode::Fail as i32,
        });
        assert_eq!(panic_health(&s), None);
    }

    #[test]
    fn maglev_is_ring_hash_on_the_header_with_one_locality() {
        let s = snap(Algorithm::Maglev);
        let cla = endpoints_for(&s);
        assert_eq!(cla.endpoints.len(), 1);
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 3);
        let c = cluster_for(&s);
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RingHash as i32);
        let l = listener_for(&s);
        let any = l
            .api_listener
            .and_then(|a| a.api_listener)
            .expect("api listener");
        let m = <hcm::HttpConnectionManager as prost::Message>::decode(&any.value[..])
            .expect("decodes");
        let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) = m.route_specifier
        else {
            panic!("inline route expected");
        };
        let Some(route::route::Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action
        else {
            panic!("route action expected");
        };
        assert_eq!(action.hash_policy.len(), 1);
        assert_eq!(
            m.http_filters.last().map(|f| f.name.as_str()),
            Some("envoy.filters.http.router")
        );
    }

    #[test]
    fn least_conn_lists_least_request_then_round_robin() {
        let c = cluster_for(&snap(Algorithm::LeastConnP2c));
        let names: Vec<String> = c
            .load_balancing_policy
            .expect("policy list")
            .policies
            .into_iter()
            .filter_map(|p| p.typed_extension_config.map(|t| t.name))
            .collect();
        assert_eq!(
            names,
            vec![
                "envoy.load_balancing_policies.least_request",
                "envoy.load_balancing_policies.wrr_locality"
            ]
        );
    }
}
