//! gRPC check: `grpc.health.v1.Health/Check` with the configured service name, over a fresh
//! plaintext HTTP/2 connection (tonic). Only `SERVING` passes.

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::Outcome;

/// Probes `address` once.
pub async fn probe(address: &str, service: &str) -> Outcome {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(e) => e,
        Err(e) => return Outcome::Fail(format!("bad address: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(_) => return Outcome::Fail("connection failed".to_owned()),
    };
    let mut client = HealthClient::new(channel);
    match client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(r) => {
            let status = r.into_inner().status;
            if status == ServingStatus::Serving as i32 {
                Outcome::Pass("SERVING".to_owned())
            } else {
                let name = ServingStatus::try_from(status)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| status.to_string());
                Outcome::Fail(name)
            }
        }
        Err(s) => Outcome::Fail(format!("gRPC {:?}", s.code())),
    }
}
