//! YAML configuration: the shipped example loads, and malformed files are rejected with a
//! message naming the field and, where it can be found, the line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use dlb::proto;
use dlb_server::{ConfigError, ServerConfig};

#[test]
fn example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dlbd.example.yaml");
    let c = ServerConfig::from_yaml_file(&path).unwrap();
    assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default", "api", "cache"]);
    let cache = &c.services[2];
    assert_eq!(cache.policy.algorithm, proto::Algorithm::Maglev as i32);
    assert_eq!(cache.policy.sticky_mode, proto::StickyMode::Fallback as i32);
    assert_eq!(cache.backends.len(), 3);
    assert_eq!(c.services[1].backends[2].weight, 1, "weight defaults to 1");
}

#[test]
fn file_errors_name_the_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "listen: 127.0.0.1:50051\nbogus: 1").unwrap();
    let e = ServerConfig::from_yaml_file(f.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    assert!(msg.contains("bogus"), "{msg}");
    let e =
        ServerConfig::from_yaml_file(std::path::Path::new("/nonexistent/dlbd.yaml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
}

const BASE: &str = "\
listen: 127.0.0.1:50051
services:
  - name: web
    policy:
      algorithm: ALG
    backends:
      - id: web-1
        address: 10.0.0.1:80
      - id: ID
        address: ADDR
        weight: WEIGHT
";

fn cfg(alg: &str, id: &str, addr: &str, weight: &str) -> String {
    BASE.replace("ALG", alg)
        .replace("ID", id)
        .replace("ADDR", addr)
        .replace("WEIGHT", weight)
}

#[test]
fn bad_configs_are_rejected_with_field_and_line() {
    let ok = cfg("maglev", "web-2", "10.0.0.2:80", "3");
    ServerConfig::from_yaml_str(&ok).unwrap();

    // (case, yaml, text the message must contain, expected line)
    let cases: Vec<(&str, String, &str, Option<usize>)> = vec![
        (
            "bad weight",
            cfg("maglev", "web-2", "10.0.0.2:80", "0"),
            "services[0].backends[1].weight",
            Some(11),
        ),
        (
            "weight too big",
            cfg("maglev", "web-2", "10.0.0.2:80", "10001"),
            "services[0].backends[1].weight",
            Some(11),
        ),
        (
            "negative weight",
            cfg("maglev", "web-2", "10.0.0.2:80", "-1"),
            "weight",
            Some(11),
        ),
        (
            "bad address",
            cfg("maglev", "web-2", "10.0.0.2", "1"),
            "services[0].backends[1].address",
            Some(10),
        ),
        (
            "duplicate id",
            cfg("maglev", "web-1", "10.0.0.2:80", "1"),
            "services[0].backends[1].id",
            Some(9),
        ),
        (
            "bad id",
            cfg("maglev", "web 2", "10.0.0.2:80", "1"),
            "services[0].backends[1].id",
            Some(9),
        ),
        (
            "bad algorithm",
            cfg("fastest", "web-2", "10.0.0.2:80", "1"),
            "services[0].policy.algorithm",
            Some(5),
        ),
        (
            "unknown field",
            ok.replace("        weight: 3", "        wieght: 3"),
            "wieght",
            Some(11),
        ),
        (
            "unknown top-level field",
            format!("{ok}colour: blue\n"),
            "colour",
            Some(12),
        ),
        (
            "bad listen",
            ok.replace("listen: 127.0.0.1:50051", "listen: localhost"),
            "listen",
            Some(1),
        ),
        (
            "bad sticky",
            ok.replace(
                "algorithm: maglev",
                "algorithm: maglev\n      sticky: always",
            ),
            "services[0].policy.sticky",
            Some(6),
        ),
        (
            "bounded load on round robin",
            ok.replace(
                "algorithm: maglev",
                "algorithm: round_robin\n      bounded_load_factor: 1.5",
            ),
            "services[0].policy.bounded_load_factor",
            Some(6),
        ),
        (
            "bad service name",
            ok.replace("name: web", "name: web/1"),
            "services[0].name",
            Some(3),
        ),
        (
            "duplicate service",
            format!("{ok}  - name: web\n"),
            "services[1].name",
            Some(12),
        ),
        ("syntax", "services: [\n".to_string(), "line", None),
    ];
    for (name, yaml, needle, line) in cases {
        let e = ServerConfig::from_yaml_str(&yaml).expect_err(name);
        let msg = e.to_string();
        assert!(
            msg.contains(needle),
            "{name}: {msg:?} does not contain {needle:?}"
        );
        if let Some(line) = line {
            assert_eq!(e.line(), Some(line), "{name}: {msg}");
        }
    }
}

#[test]
fn durations_and_sizes_have_stated_ranges() {
    for (yaml, path) in [
        (
            "keepalive: { interval_seconds: 0 }\n",
            "keepalive.interval_seconds",
        ),
        (
            "keepalive: { interval_seconds: 18446744073709551615 }\n",
            "keepalive.interval_seconds",
        ),
        (
            "keepalive: { timeout_seconds: 601 }\n",
            "keepalive.timeout_seconds",
        ),
        ("history_size: 0\n", "history_size"),
        ("history_size: 1000001\n", "history_size"),
        ("change_log_max_mib: 0\n", "change_log_max_mib"),
        ("change_log_max_mib: 65537\n", "change_log_max_mib"),
    ] {
        let e = ServerConfig::from_yaml_str(yaml).unwrap_err().to_string();
        assert!(e.contains(path), "{yaml:?}: {e}");
        assert!(e.contains("must be between"), "{yaml:?}: {e}");
        assert!(e.contains("line 1"), "{yaml:?}: {e}");
    }
    let ok = ServerConfig::from_yaml_str(
        "keepalive: { interval_seconds: 3600, timeout_seconds: 600 }\nhistory_size: 1000000\n",
    )
    .unwrap();
    ok.validate().unwrap();
    assert_eq!(
        ok.store_history_bytes,
        64 << 20,
        "the default change log bound"
    );
    let c = ServerConfig::from_yaml_str("change_log_max_mib: 8\n").unwrap();
    assert_eq!(c.store_history_bytes, 8 << 20);
    c.validate().unwrap();
    // Values set in code are checked by spawn too.
    let huge = ServerConfig {
        keepalive_interval: std::time::Duration::from_secs(u64::MAX / 2),
        ..Default::default()
    };
    let e = huge.validate().unwrap_err().to_string();
    assert!(e.contains("keepalive_interval"), "{e}");
}

#[test]
fn max_session_age_is_read_and_bounded() {
    let c = ServerConfig::from_yaml_str("max_session_age_seconds: 1800\n").unwrap();
    assert_eq!(
        c.max_session_age,
        Some(std::time::Duration::from_secs(1800))
    );
    assert_eq!(
        ServerConfig::from_yaml_str("").unwrap().max_session_age,
        None
    );
    for bad in ["0", "2592001"] {
        let e = ServerConfig::from_yaml_str(&format!("max_session_age_seconds: {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_session_age_seconds"), "{e}");
    }
}
