//! The one shutdown signal every task of a running server awaits.
//!
//! A graceful shutdown starts when the `watch` flag turns `true` (see
//! [`crate::RunningServer::shutdown`]); every long-lived task selects on [`stopped`] and returns.

use tokio::sync::watch;

/// Resolves once a graceful shutdown has started (or the flag's sender is gone). The flag's
/// read guard is dropped inside, so callers' futures stay `Send`.
pub(crate) async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}
