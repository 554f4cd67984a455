//! The YAML form of a service's health check: parsed into the policy, and mistakes located.
#![allow(clippy::unwrap_used)]

use dlb::proto;
use dlb_server::ServerConfig;

const YAML: &str = r#"
health_max_in_flight: 2048
services:
  - name: web
    policy:
      algorithm: round_robin
      health_check:
        http: { path: /healthz, host: web.internal, expected_statuses: ["200-299", "301"], body_contains: ok }
        interval_ms: 1000
        timeout_ms: 200
        healthy_threshold: 2
        unhealthy_threshold: 3
        fast_interval_ms: 250
        down_interval_ms: 2000
        jitter_percent: 10
        flap: { threshold: 4, window_ms: 60000, hold_down_ms: 30000, max_hold_down_ms: 600000 }
  - name: db
    policy:
      health_check:
        tcp: { send: "PING\r\n", expect: "+PONG" }
"#;

#[test]
fn a_health_check_is_read_into_the_policy() {
    let cfg = ServerConfig::from_yaml_str(YAML).unwrap();
    assert_eq!(cfg.health_max_in_flight, 2048);
    let web = cfg.services.iter().find(|s| s.name == "web").unwrap();
    let hc = web.policy.health_check.clone().unwrap();
    let spec = dlb::health_check::resolve(&hc).unwrap();
    assert_eq!(spec.interval.as_millis(), 1000);
    assert_eq!((spec.rise, spec.fall), (2, 3));
    assert_eq!(spec.flap_threshold, 4);
    match spec.kind {
        dlb::health_check::ProbeKind::Http {
            path,
            host,
            expected,
            body_contains,
            ..
        } => {
            assert_eq!(path, "/healthz");
            assert_eq!(host.as_deref(), Some("web.internal"));
            assert_eq!(expected, vec![(200, 299), (301, 301)]);
            assert_eq!(body_contains.as_deref(), Some("ok"));
        }
        k => panic!("{k:?}"),
    }
    let db = cfg.services.iter().find(|s| s.name == "db").unwrap();
    match &db.policy.health_check.as_ref().unwrap().kind {
        Some(proto::health_check::Kind::Tcp(t)) => {
            assert_eq!(t.send, b"PING\r\n");
            assert_eq!(t.expect_prefix, b"+PONG");
        }
        k => panic!("{k:?}"),
    }
}

#[test]
fn mistakes_name_the_path_and_line() {
    let bad = YAML.replace("timeout_ms: 200", "timeout_ms: 5000");
    let e = ServerConfig::from_yaml_str(&bad).unwrap_err().to_string();
    assert!(
        e.contains("services[0].policy.health_check.timeout_ms"),
        "{e}"
    );
    let two = YAML.replace(
        "tcp: { send: \"PING\\r\\n\", expect: \"+PONG\" }",
        "tcp: {}\n        grpc: {}",
    );
    let e = ServerConfig::from_yaml_str(&two).unwrap_err().to_string();
    assert!(e.contains("services[1].policy.health_check.kind"), "{e}");
    let zero = YAML.replace("health_max_in_flight: 2048", "health_max_in_flight: 0");
    let e = ServerConfig::from_yaml_str(&zero).unwrap_err().to_string();
    assert!(e.contains("health_max_in_flight"), "{e}");
    // The timeout fits the fast interval (250) too; hold-downs are bounded; the probe's path
    // and Host are visible ASCII. Each names its path and line.
    for (from, to, field, line) in [
        ("timeout_ms: 200", "timeout_ms: 300", "timeout_ms", 10),
        (
            "hold_down_ms: 30000",
            "hold_down_ms: 4294967295",
            "flap.hold_down_ms",
            16,
        ),
        ("path: /healthz", "path: /h\u{e9}althz", "http.path", 8),
        (
            "host: web.internal",
            "host: w\u{e9}b.internal",
            "http.host",
            8,
        ),
    ] {
        let bad = YAML.replace(from, to);
        let e = ServerConfig::from_yaml_str(&bad).unwrap_err();
        assert_eq!(e.line(), Some(line), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(&format!("services[0].policy.health_check.{field}")),
            "{e}"
        );
    }
    let unknown = YAML.replace("jitter_percent: 10", "jitter: 10");
    assert!(ServerConfig::from_yaml_str(&unknown).is_err());
}
