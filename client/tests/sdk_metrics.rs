//! The SDK's Prometheus metrics (`Client::metrics`): what they say while connected, and that the
//! age of the last update grows and `connected` drops when the control plane is gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::Client;

fn text(client: &Client) -> String {
    let mut out = String::new();
    client.metrics().encode_text(&mut out).unwrap();
    out
}

#[tokio::test]
async fn the_sdk_exports_its_session_and_each_services_freshness() {
    let server = dlb_server::spawn(config(vec![service_with("web", &["a", "b"])]))
        .await
        .unwrap();
    let client = Client::builder([endpoint(&server)])
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    let r = web.health_check_failed("b").await.unwrap();
    converge(&web, r.version).await;

    let m = text(&client);
    assert_eq!(sample(&m, "dlb_sdk_connected "), Some(1.0), "{m}");
    assert_eq!(sample(&m, "dlb_sdk_sessions_total "), Some(1.0), "{m}");
    let version = web.version().version as f64;
    assert_eq!(
        sample(&m, "dlb_sdk_version{service=\"web\"} "),
        Some(version),
        "{m}"
    );
    assert_eq!(
        sample(&m, "dlb_sdk_stale{service=\"web\"} "),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "dlb_sdk_backends{service=\"web\",eligible=\"true\"} "),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "dlb_sdk_backends{service=\"web\",eligible=\"false\"} "),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "dlb_sdk_updates_total{service=\"web\",kind=\"full\"} "),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "dlb_sdk_updates_total{service=\"web\",kind=\"delta\"} ").unwrap() >= 1.0,
        "{m}"
    );
    // Same-epoch updates older than the version routed on: refused (none from one healthy dlbd).
    assert_eq!(
        sample(&m, "dlb_sdk_regressions_refused_total{service=\"web\"} "),
        Some(0.0),
        "{m}"
    );
    let fresh = sample(&m, "dlb_sdk_last_update_age_seconds{service=\"web\"} ").unwrap();
    assert!(fresh < 5.0, "{m}");

    // The control plane goes away: the session is down and the age keeps growing.
    server.shutdown().await.unwrap();
    eventually("the client to notice", || !client.is_connected()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = text(&client);
    assert_eq!(sample(&m, "dlb_sdk_connected "), Some(0.0), "{m}");
    let later = sample(&m, "dlb_sdk_last_update_age_seconds{service=\"web\"} ").unwrap();
    assert!(later >= fresh + 0.25, "age {fresh} then {later}");
    assert_eq!(picked(&web, 10), set(&["a"]), "routing goes on meanwhile");

    // A closed client exports nothing (the metrics hold it weakly).
    let metrics = client.metrics();
    drop(web);
    drop(client);
    let mut out = String::new();
    metrics.encode_text(&mut out).unwrap();
    assert!(!out.contains("dlb_sdk_connected "), "{out}");
}
