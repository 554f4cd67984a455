//! TLS and mutual TLS on the gRPC port, with certificates generated here (rcgen), never
//! committed: allowed, plaintext refused, unknown CA, missing / foreign / expired client
//! certificate, expired server certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dlb::proto::{self, registry_client::RegistryClient};
use dlb_server::{ServerConfig, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA able to sign server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate for `names`, signed by `ca`; `expired` sets its validity in the past.
fn leaf(ca: &Ca, names: &[&str], expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn tls_server(
    ca: &Ca,
    server_expired: bool,
    client_ca: Option<&Ca>,
) -> dlb_server::RunningServer {
    let (cert, key) = leaf(ca, &["localhost"], server_expired);
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        tls: Some(TlsConfig {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: client_ca.map(|c| c.pem.clone().into_bytes()),
        }),
        ..Default::default()
    })
    .await
}

/// Calls ListServices over TLS trusting `trust`, optionally with a client identity.
async fn call(
    server: &dlb_server::RunningServer,
    trust: &Ca,
    identity: Option<(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&trust.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", server.grpc_addr()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    let channel = tokio::time::timeout(WAIT, endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    RegistryClient::new(channel)
        .list_services(proto::ListServicesRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test]
async fn tls_allows_trusting_clients_and_refuses_the_rest() {
    let ca = new_ca();
    let server = tls_server(&ca, false, None).await;
    call(&server, &ca, None)
        .await
        .expect("a client trusting the CA");
    // Plaintext against a TLS port fails.
    let plain = Endpoint::from_shared(format!("http://{}", server.grpc_addr()))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        RegistryClient::new(ch)
            .list_services(proto::ListServicesRequest {})
            .await
            .expect_err("plaintext was served on the TLS port");
    }
    // A client that does not trust the server's CA refuses it.
    let other = new_ca();
    call(&server, &other, None)
        .await
        .expect_err("a certificate from an unknown CA was accepted");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused() {
    let ca = new_ca();
    let server = tls_server(&ca, true, None).await;
    call(&server, &ca, None)
        .await
        .expect_err("an expired server certificate was accepted");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_needs_a_valid_client_certificate() {
    let ca = new_ca();
    let clients = new_ca();
    let server = tls_server(&ca, false, Some(&clients)).await;
    call(&server, &ca, Some(leaf(&clients, &["sdk-1"], false)))
        .await
        .expect("a client certificate from the client CA");
    call(&server, &ca, None)
        .await
        .expect_err("no client certificate was accepted");
    call(&server, &ca, Some(leaf(&new_ca(), &["intruder"], false)))
        .await
        .expect_err("a client certificate from another CA was accepted");
    call(&server, &ca, Some(leaf(&clients, &["old"], true)))
        .await
        .expect_err("an expired client certificate was accepted");
    server.shutdown().await.unwrap();
}
