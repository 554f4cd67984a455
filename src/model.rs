//! Domain rules shared by every entry point (gRPC server, SDK, `dlbctl`, YAML config).
//!
//! Validation lives here once so that a malformed value is rejected with the same message whether
//! it arrives over gRPC, from the command line or from a config file. Every error names the field
//! and the offending value. Building pickers from these
//! types is [`crate::routing`]'s.

use crate::proto;
pub use crate::sources::is_eligible;
pub use crate::validation::{prefix, printable, validate_id, ValidationError, MAX_QUOTED};

/// The service used when a request names none.
pub const DEFAULT_SERVICE: &str = "default";
pub use crate::validation::MAX_ID_LEN;
/// Smallest accepted weight.
pub const MIN_WEIGHT: u32 = 1;
/// Largest accepted weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Maximum length of a metadata key or value, in bytes.
pub const MAX_METADATA_LEN: usize = 256;
/// Maximum number of metadata entries on one backend.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Maximum length of an address, in bytes.
pub const MAX_ADDRESS_LEN: usize = 261;
/// Bounds of the bounded-load factor when it is enabled.
pub const LOAD_FACTOR_RANGE: std::ops::RangeInclusive<f64> = 1.0..=100.0;

/// Largest gRPC message either end of DLB sends or accepts (both ends set it explicitly).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most bytes of one listing answer (ListServices, GetHealth, ListXdsClients, ListLeases,
/// ListDns, and the circuit reports of ListServers): entries past it are left out and counted
/// (`truncated`, `total`), so a listing never fails on the message size.
pub const MAX_LIST_BYTES: usize = 4 << 20;

/// Largest encoded full snapshot of one service: [`MAX_MESSAGE_BYTES`] less room for the
/// message envelope. A write that would push a service past it is refused
/// (`RESOURCE_EXHAUSTED`), so every service always fits in one message to every SDK.
pub const MAX_SNAPSHOT_BYTES: usize = MAX_MESSAGE_BYTES - (64 << 10);

/// Most backends one service may have (the pickers index backends with `u16`).
pub const MAX_BACKENDS_PER_SERVICE: usize = crate::balance::MAX_BACKENDS;

/// What one backend record adds to an encoded full snapshot (`ServiceUpdate.upserts`, field 7):
/// tag, length prefix and the record.
pub fn snapshot_bytes(server: &proto::Server) -> usize {
    use prost::Message;
    let len = server.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Longest request key (`GetNextServer.key`, the SDK's `get_next_server(key)`), in bytes: keys
/// are hashed and may be kept in a sticky table, so they are bounded like every other input.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest sticky-binding idle TTL a policy may set, in seconds (7 days).
pub const MAX_STICKY_TTL_SECONDS: u32 = 7 * 24 * 3600;
/// Most sticky bindings a policy may ask each picker to keep.
pub const MAX_STICKY_ENTRIES: u32 = 10_000_000;
/// Most services one store may hold.
pub const MAX_SERVICES: usize = 10_000;

/// Checks a request key: at most [`MAX_KEY_LEN`] bytes.
pub fn validate_key(key: &[u8]) -> Result<(), ValidationError> {
    if key.len() > MAX_KEY_LEN {
        return Err(ValidationError::new(
            "key",
            format!("{} bytes", key.len()),
            format!("at most {MAX_KEY_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Checks a server id.
pub fn validate_server_id(value: &str) -> Result<(), ValidationError> {
    validate_id("server_id", value)
}

/// Resolves an optional service name: empty means [`DEFAULT_SERVICE`]; otherwise it must be a
/// valid identifier.
pub fn resolve_service(value: &str) -> Result<&str, ValidationError> {
    if value.is_empty() {
        return Ok(DEFAULT_SERVICE);
    }
    validate_id("service", value)?;
    Ok(value)
}

/// Checks a weight: 1..=10000.
pub fn validate_weight(value: u32) -> Result<(), ValidationError> {
    if !(MIN_WEIGHT..=MAX_WEIGHT).contains(&value) {
        return Err(ValidationError::new(
            "weight",
            value,
            format!("must be between {MIN_WEIGHT} and {MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

fn valid_dns_name(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    }) && !host
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
}

/// Checks an address: `host:port` where host is an IPv4 literal, a bracketed IPv6 literal or a
/// DNS name, and port is 1..=65535.
pub fn validate_address(value: &str) -> Result<(), ValidationError> {
    let err = |reason: &str| Err(ValidationError::new("address", value, reason));
    if value.is_empty() {
        return err("must not be empty; expected host:port");
    }
    if value.len() > MAX_ADDRESS_LEN {
        return err("too long; expected host:port");
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return err("missing port; expected host:port");
    };
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) && !port.starts_with('+') => {}
        _ => return err("port must be a number between 1 and 65535"),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return err("unterminated IPv6 literal; expected [addr]:port");
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return err("host is not a valid IPv6 address");
        }
        return Ok(());
    }
    if host.contains(':') {
        return err("IPv6 hosts must be bracketed, e.g. [::1]:8080");
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return err("host is not a valid IPv4 address");
    }
    if !valid_dns_name(host) {
        return err("host is not a valid IP address or DNS name");
    }
    Ok(())
}

/// Checks a hash key: empty (meaning "use the server id") or a valid identifier.
pub fn validate_hash_key(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Ok(());
    }
    validate_id("hash_key", value)
}

/// Checks backend metadata: at most 64 entries, keys non-empty, keys and values at most 256 bytes.
pub fn validate_metadata<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), ValidationError> {
    let mut n = 0;
    for (k, v) in entries {
        n += 1;
        if k.is_empty() {
            return Err(ValidationError::new(
                "metadata",
                k,
                "keys must not be empty",
            ));
        }
        if k.len() > MAX_METADATA_LEN {
            return Err(ValidationError::new(
                format!("metadata[{k}]"),
                k,
                format!("key longer than {MAX_METADATA_LEN} bytes"),
            ));
        }
        if v.len() > MAX_METADATA_LEN {
            return Err(ValidationError::new(
                format!("metadata[{k}]"),
                v,
                format!("value longer than {MAX_METADATA_LEN} bytes"),
            ));
        }
    }
    if n > MAX_METADATA_ENTRIES {
        return Err(ValidationError::new(
            "metadata",
            format!("{n} entries"),
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    Ok(())
}

/// Checks the fields an operator writes on a new backend (id, address, weight, hash key,
/// labels, locality, priority), in that order. The one check of a written backend: the server edge (`AddServer`),
/// the store's plan (through [`validate_server`], on every record it commits) and the client's
/// pre-check all call it, so a bad backend gets the same error wherever it is caught.
pub fn validate_backend(server: &proto::Server) -> Result<(), ValidationError> {
    validate_server_id(&server.server_id)?;
    validate_address(&server.address)?;
    validate_weight(server.weight)?;
    validate_hash_key(&server.hash_key)?;
    validate_metadata(&server.metadata)?;
    if let Some(l) = &server.locality {
        crate::locality::validate_locality("locality", l)?;
    }
    crate::locality::validate_priority("priority", server.priority)
}

/// Checks what an `UpdateServer` request sets: the id, then each field it changes (weight,
/// address, hash key; the labels only with `replace_metadata`, as they are ignored otherwise).
/// Called at the server edge and by the client's pre-check; the store's plan checks the
/// resulting record with [`validate_server`].
pub fn validate_update(req: &proto::UpdateServerRequest) -> Result<(), ValidationError> {
    validate_server_id(&req.server_id)?;
    if let Some(w) = req.weight {
        validate_weight(w)?;
    }
    if let Some(a) = &req.address {
        validate_address(a)?;
    }
    if let Some(h) = &req.hash_key {
        validate_hash_key(h)?;
    }
    if req.replace_metadata {
        validate_metadata(&req.metadata)?;
    }
    if let Some(l) = &req.locality {
        crate::locality::validate_locality("locality", l)?;
    }
    if let Some(p) = req.priority {
        crate::locality::validate_priority("priority", p)?;
    }
    Ok(())
}

/// Checks every field of a backend record as it would be stored: [`validate_backend`], then
/// the derived fields and the health sources.
pub fn validate_server(server: &proto::Server) -> Result<(), ValidationError> {
    validate_backend(server)?;
    if server.effective_weight != 0 {
        validate_weight(server.effective_weight).map_err(|e| {
            ValidationError::new("effective_weight", server.effective_weight, e.reason)
        })?;
    }
    if let Some(sources) = &server.sources {
        if proto::Verdict::try_from(sources.admin).is_err() {
            return Err(ValidationError::new(
                "sources.admin",
                sources.admin,
                "must be unset, healthy or unhealthy",
            ));
        }
        for (field, state) in [
            ("sources.probe", &sources.probe),
            ("sources.outlier", &sources.outlier),
        ] {
            let Some(state) = state else { continue };
            if proto::Verdict::try_from(state.verdict).is_err() {
                return Err(ValidationError::new(
                    format!("{field}.verdict"),
                    state.verdict,
                    "must be unset, healthy or unhealthy",
                ));
            }
            if state.detail.len() > crate::sources::MAX_DETAIL_LEN {
                return Err(ValidationError::new(
                    format!("{field}.detail"),
                    format!("{} bytes", state.detail.len()),
                    format!("at most {} bytes", crate::sources::MAX_DETAIL_LEN),
                ));
            }
        }
        if let Some(l) = &sources.latency {
            if l.weight_percent > 100 {
                return Err(ValidationError::new(
                    "sources.latency.weight_percent",
                    l.weight_percent,
                    "must be at most 100",
                ));
            }
            if l.detail.len() > crate::sources::MAX_DETAIL_LEN {
                return Err(ValidationError::new(
                    "sources.latency.detail",
                    format!("{} bytes", l.detail.len()),
                    format!("at most {} bytes", crate::sources::MAX_DETAIL_LEN),
                ));
            }
        }
    }
    Ok(())
}

/// The policy of a new service: smooth weighted round robin, no bounded load, no stickiness.
pub fn default_policy() -> proto::Policy {
    proto::Policy {
        algorithm: proto::Algorithm::RoundRobin as i32,
        bounded_load_factor: 0.0,
        sticky_mode: proto::StickyMode::None as i32,
        sticky_ttl_seconds: 0,
        sticky_max_entries: 0,
        outlier_detection: None,
        panic: None,
        health_check: None,
        slow_start: None,
        circuit_breaker: None,
        adaptive_weights: None,
        retry: None,
        retry_budget: None,
        hedge: None,
        peak_ewma: None,
        locality: None,
    }
}

/// Checks a policy as it would be stored. `ALGORITHM_UNSPECIFIED` is rejected here: callers that
/// treat it as "keep the current algorithm" must substitute it first.
pub fn validate_policy(policy: &proto::Policy) -> Result<(), ValidationError> {
    match proto::Algorithm::try_from(policy.algorithm) {
        Ok(proto::Algorithm::Unspecified) | Err(_) => {
            return Err(ValidationError::new(
                "policy.algorithm",
                policy.algorithm,
                "must be one of round_robin, least_conn_exact, least_conn_p2c, maglev, ring_hash, peak_ewma",
            ))
        }
        Ok(_) => {}
    }
    let c = policy.bounded_load_factor;
    if c != 0.0 && !(c.is_finite() && LOAD_FACTOR_RANGE.contains(&c)) {
        return Err(ValidationError::new(
            "policy.bounded_load_factor",
            c,
            "must be 0 (off) or between 1.0 and 100.0",
        ));
    }
    if c != 0.0 {
        let alg = proto::Algorithm::try_from(policy.algorithm).ok();
        if !matches!(
            alg,
            Some(proto::Algorithm::Maglev | proto::Algorithm::RingHash)
        ) {
            return Err(ValidationError::new(
                "policy.bounded_load_factor",
                c,
                "bounded load applies only to maglev and ring_hash",
            ));
        }
    }
    if policy.sticky_ttl_seconds > MAX_STICKY_TTL_SECONDS {
        return Err(ValidationError::new(
            "policy.sticky_ttl_seconds",
            policy.sticky_ttl_seconds,
            format!("must be at most {MAX_STICKY_TTL_SECONDS} (7 days); 0 means the default"),
        ));
    }
    if policy.sticky_max_entries > MAX_STICKY_ENTRIES {
        return Err(ValidationError::new(
            "policy.sticky_max_entries",
            policy.sticky_max_entries,
            format!("must be at most {MAX_STICKY_ENTRIES}; 0 means the default"),
        ));
    }
    if proto::StickyMode::try_from(policy.sticky_mode).is_err() {
        return Err(ValidationError::new(
            "policy.sticky_mode",
            policy.sticky_mode,
            "must be none, strict or fallback",
        ));
    }
    if let Some(hc) = &policy.health_check {
        crate::health_check::validate(hc)?;
    }
    crate::slow_start::validate(policy)?;
    crate::circuit::validate(policy)?;
    crate::adaptive::validate(policy)?;
    crate::call::validate(policy)?;
    crate::locality::validate_locality_policy(policy)?;
    crate::health_policy::validate(policy)
}

/// Checks a policy as `SetPolicy` writes it and returns it as it would be stored:
/// `ALGORITHM_UNSPECIFIED` keeps `stored`, the service's current algorithm. A caller that does
/// not know it (`None`: a client's pre-check) substitutes one that accepts the other fields, so
/// only their own ranges are checked; the store, which knows it, checks the combination. The
/// one check of a policy write: the client calls it before sending, the store's plan on commit.
pub fn validate_policy_write(
    policy: &proto::Policy,
    stored: Option<i32>,
) -> Result<proto::Policy, ValidationError> {
    let mut p = policy.clone();
    if p.algorithm == proto::Algorithm::Unspecified as i32 {
        p.algorithm = stored.unwrap_or(if p.bounded_load_factor != 0.0 {
            proto::Algorithm::Maglev as i32
        } else {
            proto::Algorithm::RoundRobin as i32
        });
    }
    validate_policy(&p)?;
    Ok(p)
}

/// Parses an algorithm name as used by `dlbctl` and the YAML config (`round_robin`, `wrr`,
/// `least_conn`, `least_conn_exact`, `p2c`, `least_conn_p2c`, `maglev`, `ring_hash`,
/// `peak_ewma`, `ewma`).
pub fn parse_algorithm(field: &str, value: &str) -> Result<proto::Algorithm, ValidationError> {
    Ok(
        match value.to_ascii_lowercase().replace('-', "_").as_str() {
            "round_robin" | "wrr" | "rr" => proto::Algorithm::RoundRobin,
            "least_conn" | "least_conn_exact" => proto::Algorithm::LeastConnExact,
            "p2c" | "least_conn_p2c" => proto::Algorithm::LeastConnP2c,
            "maglev" => proto::Algorithm::Maglev,
            "ring_hash" | "ring" | "ketama" => proto::Algorithm::RingHash,
            "peak_ewma" | "ewma" => proto::Algorithm::PeakEwma,
            _ => return Err(ValidationError::new(
                field,
                value,
                "must be one of round_robin, least_conn_exact, least_conn_p2c, maglev, ring_hash, peak_ewma",
            )),
        },
    )
}

/// The canonical name of an algorithm (inverse of [`parse_algorithm`]).
pub fn algorithm_name(value: i32) -> &'static str {
    match proto::Algorithm::try_from(value) {
        Ok(proto::Algorithm::RoundRobin) => "round_robin",
        Ok(proto::Algorithm::LeastConnExact) => "least_conn_exact",
        Ok(proto::Algorithm::LeastConnP2c) => "least_conn_p2c",
        Ok(proto::Algorithm::Maglev) => "maglev",
        Ok(proto::Algorithm::RingHash) => "ring_hash",
        Ok(proto::Algorithm::PeakEwma) => "peak_ewma",
        _ => "unspecified",
    }
}

/// Parses a sticky mode name (`none`, `strict`, `fallback`).
pub fn parse_sticky_mode(field: &str, value: &str) -> Result<proto::StickyMode, ValidationError> {
    Ok(match value.to_ascii_lowercase().as_str() {
        "none" | "off" => proto::StickyMode::None,
        "strict" => proto::StickyMode::Strict,
        "fallback" => proto::StickyMode::Fallback,
        _ => {
            return Err(ValidationError::new(
                field,
                value,
                "must be one of none, strict, fallback",
            ))
        }
    })
}

/// The canonical name of a sticky mode (inverse of [`parse_sticky_mode`]).
pub fn sticky_mode_name(value: i32) -> &'static str {
    match proto::StickyMode::try_from(value) {
        Ok(proto::StickyMode::Strict) => "strict",
        Ok(proto::StickyMode::Fallback) => "fallback",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_server_id("web-1.a_b:c").is_ok());
        assert!(validate_server_id("").is_err());
        assert!(validate_server_id("a b").is_err());
        assert!(validate_server_id("é").is_err());
        assert!(validate_server_id(&"a".repeat(128)).is_ok());
        let e = validate_server_id(&"a".repeat(129)).unwrap_err();
        assert_eq!(e.field, "server_id");
        assert_eq!(resolve_service(""), Ok("default"));
        assert_eq!(resolve_service("x/y").unwrap_err().field, "service");
    }

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "db.internal:5432",
            "localhost:1",
            "a-b.c.example.com.:65535",
        ] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:http",
            "300.1.1.1:80",
            "::1:80",
            "[::1:80",
            "[zz]:80",
            "-bad.com:80",
            "bad_host:80",
            ":80",
            "1.2.3:80",
            "host:+80",
        ] {
            let e = validate_address(bad).expect_err(bad);
            assert_eq!(e.field, "address");
        }
    }

    #[test]
    fn weights_and_policies() {
        assert!(validate_weight(0).is_err());
        assert!(validate_weight(1).is_ok());
        assert!(validate_weight(10_000).is_ok());
        assert!(validate_weight(10_001).is_err());
        let mut p = default_policy();
        assert!(validate_policy(&p).is_ok());
        p.bounded_load_factor = 1.25;
        assert_eq!(
            validate_policy(&p).unwrap_err().field,
            "policy.bounded_load_factor"
        );
        p.algorithm = proto::Algorithm::Maglev as i32;
        assert!(validate_policy(&p).is_ok());
        p.bounded_load_factor = 0.5;
        assert!(validate_policy(&p).is_err());
        p.bounded_load_factor = f64::NAN;
        assert!(validate_policy(&p).is_err());
        p.bounded_load_factor = 0.0;
        p.algorithm = 99;
        assert_eq!(validate_policy(&p).unwrap_err().field, "policy.algorithm");
    }

    #[test]
    fn errors_quote_a_short_prefix_of_huge_values() {
        let huge = "x".repeat(9_000);
        let e = validate_server_id(&huge).unwrap_err();
        let msg = e.to_string();
        assert!(msg.len() <= 512, "{} bytes: {msg}", msg.len());
        assert!(msg.contains("(9000 bytes)"), "{msg}");
        let key = "k".repeat(5_000);
        let mut m = std::collections::HashMap::new();
        m.insert(key, "v".into());
        let msg = validate_metadata(&m).unwrap_err().to_string();
        assert!(msg.len() <= 512, "{} bytes: {msg}", msg.len());
        // Short values are quoted whole, as before.
        let msg = validate_server_id("bad id").unwrap_err().to_string();
        assert!(msg.starts_with("invalid server_id \"bad id\": "), "{msg}");
        // Multi-byte characters are cut at a boundary.
        let e = ValidationError::new("f", "é".repeat(100), "r");
        assert!(e.value.len() <= MAX_QUOTED && e.value.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_backend_write_is_checked_in_one_order_wherever_it_is_caught() {
        let mut s = proto::Server {
            server_id: "a".into(),
            address: "10.0.0.1:80".into(),
            weight: 1,
            ..Default::default()
        };
        assert!(validate_backend(&s).is_ok());
        // The first bad field is the one named: address before weight.
        s.weight = 0;
        s.address = "x".into();
        assert_eq!(validate_backend(&s).unwrap_err().field, "address");
        s.address = "10.0.0.1:80".into();
        assert_eq!(validate_backend(&s).unwrap_err().field, "weight");
        // The store's check of a whole record starts with the same one.
        assert_eq!(validate_server(&s), validate_backend(&s));
        s.weight = 1;
        s.metadata.insert(String::new(), "v".into());
        assert_eq!(validate_server(&s).unwrap_err().field, "metadata");

        let mut u = proto::UpdateServerRequest {
            server_id: "a".into(),
            ..Default::default()
        };
        assert!(validate_update(&u).is_ok());
        // Labels are ignored (so not checked) unless they replace the old ones.
        u.metadata.insert(String::new(), "v".into());
        assert!(validate_update(&u).is_ok());
        u.replace_metadata = true;
        assert_eq!(validate_update(&u).unwrap_err().field, "metadata");
        u.hash_key = Some("a b".into());
        assert_eq!(validate_update(&u).unwrap_err().field, "hash_key");
        u.address = Some("x".into());
        assert_eq!(validate_update(&u).unwrap_err().field, "address");
        u.weight = Some(10_001);
        assert_eq!(validate_update(&u).unwrap_err().field, "weight");
        u.server_id = String::new();
        assert_eq!(validate_update(&u).unwrap_err().field, "server_id");
    }

    #[test]
    fn a_policy_write_keeps_the_stored_algorithm_when_it_names_none() {
        let bounded = proto::Policy {
            bounded_load_factor: 1.25,
            ..Default::default()
        };
        let rr = proto::Algorithm::RoundRobin as i32;
        let maglev = proto::Algorithm::Maglev as i32;
        // The store knows the algorithm: bounded load on round robin is refused.
        let e = validate_policy_write(&bounded, Some(rr)).unwrap_err();
        assert_eq!(e.field, "policy.bounded_load_factor");
        let p = validate_policy_write(&bounded, Some(maglev)).expect("valid on maglev");
        assert_eq!(p.algorithm, maglev);
        // A client does not: only the field's own range is checked.
        assert!(validate_policy_write(&bounded, None).is_ok());
        let out_of_range = proto::Policy {
            bounded_load_factor: 0.5,
            ..Default::default()
        };
        assert!(validate_policy_write(&out_of_range, None).is_err());
        // A named algorithm is kept and checked as it is.
        let named = proto::Policy {
            algorithm: rr,
            bounded_load_factor: 1.25,
            ..Default::default()
        };
        assert!(validate_policy_write(&named, Some(maglev)).is_err());
        assert!(validate_policy_write(&proto::Policy::default(), None).is_ok());
    }
}
