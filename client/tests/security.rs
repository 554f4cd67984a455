//! The SDK against a locked-down dlbd: a read token for the session and an admin token for
//! writes, and TLS with a CA generated here.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::admin::ClientTls;
use dlb_client::Client;
use dlb_server::api::auth::AuthConfig;

const ADMIN: &str = "sdk-admin-token-000001";

#[tokio::test]
async fn the_sdk_sends_its_token_on_the_session_and_admin_calls() {
    let mut cfg = config(vec![service_with("web", &["a"])]);
    cfg.auth = AuthConfig {
        admin_tokens: vec![ADMIN.into()],
        read_tokens: vec!["sdk-read-token-0000001".into()],
    };
    let server = dlb_server::spawn(cfg).await.unwrap();
    let ep = format!("http://{}", server.grpc_addr());
    // Without a token the session is refused: connect fails.
    let refused = Client::builder([ep.clone()])
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await;
    assert!(refused.is_err(), "a session without a token was served");
    // With the admin token: session and writes.
    let client = Client::builder([ep])
        .token(ADMIN)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 5), set(&["a"]));
    let r = web.add_server("b", "127.0.0.1:9002", 1).await.unwrap();
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_sdk_speaks_tls() {
    let (ca_pem, tls) = tls_server(&["localhost"]);
    let mut cfg = config(vec![service_with("web", &["a"])]);
    cfg.tls = Some(tls);
    let server = dlb_server::spawn(cfg).await.unwrap();
    let client = Client::builder([format!("https://localhost:{}", server.grpc_addr().port())])
        .tls(ClientTls {
            ca_pem: ca_pem.into_bytes(),
            identity: None,
            domain: None,
        })
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 5), set(&["a"]));
    server.shutdown().await.unwrap();
}
