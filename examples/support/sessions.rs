//! Shared by the benchmark examples (`propagation`, `drain_barrier`): many SDK sessions
//! subscribed to one service, connected 50 at a time.

use std::time::Duration;

use dlb_client::{Client, ServiceHandle};

/// `n` SDK clients of `endpoint` (ids `bench-0..`), each subscribed to `service`; the clients
/// (kept alive by the caller) and their handles, in completion order.
pub async fn connect(
    endpoint: &str,
    service: &'static str,
    n: usize,
) -> anyhow::Result<(Vec<Client>, Vec<ServiceHandle>)> {
    let mut handles = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(50) {
        let mut set = tokio::task::JoinSet::new();
        for i in chunk * 50..((chunk + 1) * 50).min(n) {
            let endpoint = endpoint.to_owned();
            set.spawn(async move {
                let client = Client::builder([endpoint])
                    .client_id(format!("bench-{i}"))
                    .connect_timeout(Duration::from_secs(10))
                    .subscribe_timeout(Duration::from_secs(30))
                    .connect()
                    .await?;
                let handle = client.service(service).await?;
                Ok::<_, dlb_client::Error>((client, handle))
            });
        }
        while let Some(r) = set.join_next().await {
            let (client, handle) = r??;
            clients.push(client);
            handles.push(handle);
        }
    }
    Ok((clients, handles))
}
