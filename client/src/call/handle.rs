//! The [`ServiceHandle`] side of the call path: building a [`Balance`] from a handle, its
//! counters, and the pick that avoids the backends a request already tried (retries and hedges
//! never go to the same backend twice).

use dlb::balance::PickError;

use super::{Balance, CallCounts, Protocol};
use crate::{CallGuard, Error, Result, ServiceHandle};

impl ServiceHandle {
    /// A pick that avoids the backends in `tried` (for retries and hedges): a few ordinary
    /// picks, then a walk from a random start over the eligible backends not tried.
    pub(crate) fn pick_excluding(&self, key: Option<&[u8]>, tried: &[String]) -> Result<CallGuard> {
        let first = self.get_next_server(key);
        if tried.is_empty() {
            return first;
        }
        let mut last = first;
        for _ in 0..3 {
            match last {
                Ok(g) if !tried.iter().any(|t| t == g.server_id()) => return Ok(g),
                Err(e) => return Err(e),
                Ok(_) => last = self.get_next_server(key),
            }
        }
        drop(last);
        let snap = self.state.snapshot.load();
        let Some(picker) = &snap.picker else {
            return Err(self.no_picker());
        };
        let n = picker.backends().len();
        let start = if n > 0 { fastrand::usize(..n) } else { 0 };
        for off in 0..n {
            let b = &picker.backends()[(start + off) % n];
            if !b.is_eligible() || tried.iter().any(|t| t == b.id()) {
                continue;
            }
            if let Some(pick) = picker.pick_id(b.id()) {
                return Ok(CallGuard::from_shared(
                    pick.into_owned(picker),
                    self.call_clock(),
                ));
            }
        }
        Err(Error::NoBackend {
            service: self.state.name.clone(),
            reason: PickError::NoEligibleBackends,
        })
    }

    /// A gRPC transport over this service with default options: give it to a generated tonic
    /// client (`GreeterClient::new(handle.channel())`). See [`crate::call`].
    pub fn channel(&self) -> Balance {
        Balance::builder(self.clone()).build()
    }

    /// An HTTP/1.1 `tower::Service` over this service with default options.
    pub fn http(&self) -> Balance {
        Balance::builder(self.clone())
            .protocol(Protocol::Http1)
            .build()
    }

    /// The call-path counters of this service (requests, errors, retries, hedges…).
    pub fn call_counts(&self) -> CallCounts {
        self.client.call_stats(self.name()).counts()
    }
}
