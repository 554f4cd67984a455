//! The clock that times calls (the [`CallGuard`](crate::CallGuard)'s start and its latency).
//!
//! Every pick reads a clock once, so its cost is part of the pick path. By default the SDK reads
//! the CPU's time-stamp counter through [`quanta`] (a raw counter read at the pick, converted to
//! nanoseconds only when the call ends; quanta calibrates it against the OS monotonic clock and
//! falls back to that clock where the TSC is not invariant). That is several times cheaper than
//! `Instant::now()` (a vDSO call, plus a thread-local lookup with tokio's `test-util`).
//!
//! [`CallClock::Tokio`] times calls with `tokio::time::Instant` instead, so that tests running
//! on paused tokio time see the latencies they simulate with `tokio::time::sleep` (set it with
//! [`ClientBuilder::call_clock`](crate::ClientBuilder::call_clock)).

use std::sync::OnceLock;
use std::time::Duration;

/// Which clock times the calls of a client's services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallClock {
    /// The TSC via `quanta` (default): the cheapest monotonic clock of the machine.
    #[default]
    Tsc,
    /// `tokio::time::Instant`: follows paused and advanced tokio time (tests).
    Tokio,
}

/// The process's calibrated TSC clock (calibration runs once, on first use).
fn tsc() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// When a call started, on the clock its service uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// A raw TSC reading (see [`quanta::Clock::raw`]).
    Tsc(u64),
    /// A tokio instant.
    Tokio(tokio::time::Instant),
}

impl Start {
    /// Now, on `clock`.
    #[inline]
    pub(crate) fn now(clock: CallClock) -> Self {
        match clock {
            CallClock::Tsc => Start::Tsc(tsc().raw()),
            CallClock::Tokio => Start::Tokio(tokio::time::Instant::now()),
        }
    }

    /// Time since this start.
    pub(crate) fn elapsed(&self) -> Duration {
        match *self {
            Start::Tsc(raw) => {
                let c = tsc();
                c.delta(raw, c.raw())
            }
            Start::Tokio(t) => t.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_elapsed_follows_real_time() {
        let s = Start::now(CallClock::Tsc);
        std::thread::sleep(Duration::from_millis(20));
        let e = s.elapsed();
        assert!(e >= Duration::from_millis(19), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let s = Start::now(CallClock::Tokio);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(s.elapsed(), Duration::from_secs(3));
        let t = Start::now(CallClock::Tsc);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the TSC does not follow paused time"
        );
    }
}
