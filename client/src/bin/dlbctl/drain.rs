//! `dlbctl drain` and `dlbctl remove-server --wait`: the drain barrier (`docs/drain.md`) — the
//! flags' parsing, the call, and the answer printed (text or JSON). A barrier whose deadline
//! passed before every client confirmed exits 6 after printing who had not.

use dlb::proto;
use dlb_client::{AdminClient, Error};
use serde_json::{json, Value};

use crate::print::version_text;

/// Parses a barrier timeout: `30s`, `500ms`, `2m`, or a bare number of seconds; into
/// milliseconds, 1..=3,600,000.
pub(crate) fn parse_timeout(s: &str) -> Result<u32, String> {
    let (num, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1_000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 500ms or 2m"))?;
    let ms = n.saturating_mul(unit_ms);
    if !(1..=u64::from(dlb_client::admin::MAX_BARRIER_TIMEOUT_MS)).contains(&ms) {
        return Err(format!("{s:?}: must be between 1ms and 1h"));
    }
    u32::try_from(ms).map_err(|_| format!("{s:?}: must be between 1ms and 1h"))
}

/// The wait option of the flags (`None` without `--wait`).
pub(crate) fn wait(
    wait: bool,
    in_flight_zero: bool,
    timeout_ms: u32,
) -> Option<proto::BarrierWait> {
    wait.then_some(proto::BarrierWait {
        in_flight_zero,
        timeout_ms,
    })
}

/// `dlbctl drain ID [--wait [--in-flight-zero] [--timeout 30s]]`.
pub(crate) async fn drain(
    admin: &AdminClient,
    service: &str,
    id: &str,
    wait: Option<proto::BarrierWait>,
    json_out: bool,
) -> Result<(), Error> {
    let r = admin.drain_server(service, id, wait).await?;
    if json_out {
        println!(
            "{}",
            json!({"service": r.service, "drained": id,
                   "version": crate::print::version_json(r.version),
                   "barrier": r.barrier.as_ref().map(barrier_json)})
        );
    } else {
        println!(
            "drained {id} in {} ({})",
            r.service,
            version_text(r.version)
        );
        if let Some(b) = &r.barrier {
            print_barrier(b);
        }
    }
    outcome(r.barrier.as_ref())
}

/// `dlbctl remove-server ID --wait [--timeout 30s]`.
pub(crate) async fn remove_waiting(
    admin: &AdminClient,
    service: &str,
    id: &str,
    wait: proto::BarrierWait,
    json_out: bool,
) -> Result<(), Error> {
    let r = admin.remove_server_waiting(service, id, wait).await?;
    if json_out {
        println!(
            "{}",
            json!({"service": r.service, "removed": id,
                   "version": crate::print::version_json(r.version),
                   "barrier": r.barrier.as_ref().map(barrier_json)})
        );
    } else {
        println!(
            "removed {id} from {} ({})",
            r.service,
            version_text(r.version)
        );
        if let Some(b) = &r.barrier {
            print_barrier(b);
        }
    }
    outcome(r.barrier.as_ref())
}

/// Exit 6 when the deadline ended the wait.
fn outcome(b: Option<&proto::DrainBarrier>) -> Result<(), Error> {
    match b {
        Some(b) if b.ended() == proto::BarrierEnd::Deadline => {
            Err(Error::BarrierDeadline(format!(
                "deadline passed after {} ms; {} client(s) had not confirmed version {}",
                b.waited_ms, b.pending_total, b.version
            )))
        }
        _ => Ok(()),
    }
}

fn ended(b: &proto::DrainBarrier) -> &'static str {
    match b.ended() {
        proto::BarrierEnd::Confirmed => "confirmed",
        proto::BarrierEnd::InFlightZero => "in_flight_zero",
        proto::BarrierEnd::Deadline => "deadline",
        proto::BarrierEnd::Unspecified => "unspecified",
    }
}

fn client_json(c: &proto::BarrierClient) -> Value {
    json!({"kind": c.kind, "id": c.id, "replica": c.replica,
           "acked_version": c.acked_version, "peer": c.peer})
}

fn barrier_json(b: &proto::DrainBarrier) -> Value {
    json!({"ended": ended(b), "version": b.version, "confirmed": b.confirmed,
           "pending": b.pending.iter().map(client_json).collect::<Vec<_>>(),
           "pending_total": b.pending_total,
           "stalled": b.stalled.iter().map(client_json).collect::<Vec<_>>(),
           "in_flight": b.in_flight, "waited_ms": b.waited_ms})
}

fn print_barrier(b: &proto::DrainBarrier) {
    println!(
        "barrier: {} after {} ms ({} client(s) confirmed version {}, {} in flight)",
        ended(b),
        b.waited_ms,
        b.confirmed,
        b.version,
        b.in_flight
    );
    let line = |c: &proto::BarrierClient| {
        format!(
            "{} {} on {} acked {} {}",
            c.kind, c.id, c.replica, c.acked_version, c.peer
        )
    };
    for c in &b.pending {
        println!("  not confirmed: {}", line(c));
    }
    let more = (b.pending_total as usize).saturating_sub(b.pending.len());
    if more > 0 {
        println!("  ({more} more not shown)");
    }
    for c in &b.stalled {
        println!(
            "  stalled (past the stall cut-off, not counted): {}",
            line(c)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("30s"), Ok(30_000));
        assert_eq!(parse_timeout("500ms"), Ok(500));
        assert_eq!(parse_timeout("2m"), Ok(120_000));
        assert_eq!(parse_timeout("7"), Ok(7_000));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("2h").is_err());
        assert!(parse_timeout("61m").is_err());
        assert!(parse_timeout("x").is_err());
    }
}
