//! The control-plane endpoints the session rotates over: static endpoints and DNS names.
//!
//! The configured endpoints are [`Target`]s, kept in the order given. A static one
//! (`http://host:port`, `host:port`) is one entry of the rotation with one lazily connected
//! channel. A name (`dns:///host:port`, see [`crate::Resolve`]) is every address of its last
//! good answer, each its own entry and channel (`http(s)://ip:port`; with TLS the certificate is
//! still verified against the name).
//!
//! The rotation goes in *passes*: a pass lists every entry once — targets in order, a name's
//! addresses in place of the name — and the session tries them one after the other
//! ([`Targets::next`]). A new pass starts, and every name is resolved again first:
//!
//! * when the pass is over (every entry was tried once), so a name's new replicas are found
//!   after one round over the old ones;
//! * when the session that ended was established or the server said `GoingAway`
//!   ([`Targets::restart`]): the world may have changed while it lasted, and a replica shutting
//!   down is the usual reason the answer changes.
//!
//! A new pass is rotated to begin after the endpoint tried last, which goes last: static
//! endpoints keep strict round-robin order across passes, and a name's address just left is
//! not tried again first. After `GoingAway` ([`Targets::go_elsewhere`]) the new pass begins at
//! an entry drawn at random among the others instead: the server sends sessions away to spread
//! them (maximum session age) or because it stops, and with the same endpoint list everywhere
//! "the next one" would move all of its sessions, as a pile, to one replica.
//!
//! An answer's addresses are deduplicated, shuffled (once per answer, so a fleet of SDKs given
//! the same answer spreads over the replicas, like gRPC's `pick_first` shuffle) and capped at
//! [`MAX_ADDRESSES`]. Each lookup is bounded by the connect timeout; a lookup that fails, times
//! out or answers nothing keeps the previous answer (logged at warn). A name without any answer
//! yet adds nothing to the pass; when the pass is empty, [`Targets::next`] says so and the
//! session backs off before it asks again. Names are looked up concurrently; a pass costs one
//! lookup per name and `O(entries)` to build.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::Channel;

use crate::channel::{self, ChannelOptions};
use crate::resolve::{DnsName, Resolve};

/// Most addresses kept from one answer (a random subset of a larger one): each is a channel,
/// and one session at a time uses one of them.
pub(crate) const MAX_ADDRESSES: usize = 64;

/// One entry of the rotation: the endpoint as reported by `Client::current_endpoint` and its
/// channel.
pub(crate) type Entry = (Arc<str>, Channel);

/// One configured endpoint.
#[derive(Debug)]
pub(crate) enum Target {
    /// A static endpoint: one channel (the transport resolves a host name itself).
    Static(Entry),
    /// A `dns:` endpoint and the addresses of its last good answer.
    Name {
        /// The endpoint as given (for logs and errors).
        raw: String,
        /// What to resolve.
        name: DnsName,
        /// The last good answer, shuffled, each address with its channel.
        addrs: Vec<(SocketAddr, Entry)>,
    },
}

impl Target {
    /// A static endpoint over `channel`.
    pub(crate) fn fixed(raw: &str, channel: Channel) -> Self {
        Self::Static((raw.into(), channel))
    }

    /// A name, not resolved yet.
    pub(crate) fn name(raw: &str, name: DnsName) -> Self {
        Self::Name {
            raw: raw.to_owned(),
            name,
            addrs: Vec::new(),
        }
    }
}

/// The rotation over every target (see the module docs).
#[derive(Debug)]
pub(crate) struct Targets {
    targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    /// Transport options of the channels of resolved addresses.
    opts: ChannelOptions,
    /// The current pass.
    pass: Vec<Entry>,
    /// Index in `pass` of the next entry to try.
    next: usize,
    /// The endpoint handed out last: a new pass begins after it.
    last: Option<Arc<str>>,
    /// Start a new pass before the next entry.
    restart: bool,
    /// Begin that pass at a random entry other than the one left.
    elsewhere: bool,
}

impl Targets {
    /// A rotation over `targets` (in order), resolving names with `resolver`; lookups are
    /// bounded by `opts.connect_timeout`.
    pub(crate) fn new(
        targets: Vec<Target>,
        resolver: Arc<dyn Resolve>,
        opts: ChannelOptions,
    ) -> Self {
        Self {
            targets,
            resolver,
            opts,
            pass: Vec::new(),
            next: 0,
            last: None,
            restart: false,
            elsewhere: false,
        }
    }

    /// The next endpoint to try: the next entry of the current pass, or the first of a new one
    /// (names resolved again first) when the pass is over or a restart was asked for. `None`
    /// when the new pass is empty (no static endpoint, and no name has any address yet): back
    /// off and ask again.
    pub(crate) async fn next(&mut self) -> Option<Entry> {
        if self.next >= self.pass.len() || self.restart {
            self.restart = false;
            self.resolve().await;
            self.pass = self.build_pass();
            if std::mem::take(&mut self.elsewhere) && self.pass.len() > 1 {
                // The entry left is last: begin anywhere before it.
                let n = self.pass.len() - 1;
                self.pass.rotate_left(fastrand::usize(..n));
            }
            self.next = 0;
        }
        let entry = self.pass.get(self.next)?.clone();
        self.next += 1;
        self.last = Some(entry.0.clone());
        Some(entry)
    }

    /// Starts a new pass (names resolved again) before the next entry: after an established
    /// session ended or the server said `GoingAway`.
    pub(crate) fn restart(&mut self) {
        self.restart = true;
    }

    /// As [`Targets::restart`], the new pass beginning at an entry drawn at random among the
    /// others: after `GoingAway`.
    pub(crate) fn go_elsewhere(&mut self) {
        self.restart = true;
        self.elsewhere = true;
    }

    /// Every target in order, a name's addresses in its place, rotated so that the entries
    /// after the one handed out last come first and that one goes last.
    fn build_pass(&self) -> Vec<Entry> {
        let mut pass: Vec<Entry> = Vec::new();
        for target in &self.targets {
            match target {
                Target::Static(entry) => pass.push(entry.clone()),
                Target::Name { addrs, .. } => pass.extend(addrs.iter().map(|(_, e)| e.clone())),
            }
        }
        let last = self.last.as_deref();
        if let Some(i) = last.and_then(|last| pass.iter().position(|(e, _)| &**e == last)) {
            pass.rotate_left(i + 1);
        }
        pass
    }

    /// Looks every name up (concurrently, each bounded by the connect timeout) and keeps each
    /// good answer.
    async fn resolve(&mut self) {
        let timeout = self.opts.connect_timeout;
        let lookups = self.targets.iter().enumerate().filter_map(|(i, target)| {
            let Target::Name { name, .. } = target else {
                return None;
            };
            let lookup = self.resolver.resolve(&name.host, name.port);
            Some(async move { (i, tokio::time::timeout(timeout, lookup).await) })
        });
        let answers = futures::future::join_all(lookups).await;
        for (i, answer) in answers {
            let Some(Target::Name { raw, name, addrs }) = self.targets.get_mut(i) else {
                continue;
            };
            let found = match answer {
                Ok(Ok(found)) if !found.is_empty() => found,
                Ok(Ok(_)) => {
                    tracing::warn!(endpoint = %raw, kept = addrs.len(),
                        "the name has no address; keeping the previous answer");
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(endpoint = %raw, %error, kept = addrs.len(),
                        "cannot resolve the name; keeping the previous answer");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(endpoint = %raw, ?timeout, kept = addrs.len(),
                        "resolving the name timed out; keeping the previous answer");
                    continue;
                }
            };
            *addrs = answer_entries(raw, name, found, addrs, &self.opts);
            tracing::debug!(endpoint = %raw, addresses = addrs.len(), "name resolved");
        }
    }
}

/// The entries of a good answer: deduplicated, shuffled, capped at [`MAX_ADDRESSES`]; an
/// address already known keeps its channel (and its connection).
fn answer_entries(
    raw: &str,
    name: &DnsName,
    mut found: Vec<SocketAddr>,
    previous: &[(SocketAddr, Entry)],
    opts: &ChannelOptions,
) -> Vec<(SocketAddr, Entry)> {
    found.sort_unstable();
    found.dedup();
    fastrand::shuffle(&mut found);
    found.truncate(MAX_ADDRESSES);
    let known: HashMap<SocketAddr, &Entry> = previous.iter().map(|(a, e)| (*a, e)).collect();
    found
        .into_iter()
        .filter_map(|addr| {
            if let Some(entry) = known.get(&addr) {
                return Some((addr, (*entry).clone()));
            }
            // The name was checked when the client was built; an address cannot make the URI
            // invalid, but nothing here may panic either.
            match channel::resolved_endpoint(raw, name, addr, opts) {
                Ok(endpoint) => {
                    let uri = endpoint.uri().to_string();
                    let shown = uri.strip_suffix('/').unwrap_or(&uri);
                    Some((addr, (shown.into(), endpoint.connect_lazy())))
                }
                Err(error) => {
                    tracing::warn!(endpoint = %raw, %addr, %error, "skipping a resolved address");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use parking_lot::Mutex;

    use super::*;

    /// Bound of a test's lookups that never answer.
    const TEST_TIMEOUT: Duration = Duration::from_secs(2);

    /// A resolver answering what the test says: `Some(addresses)`, `None` for an error; and
    /// `hang` for a lookup that never answers. Counts lookups.
    #[derive(Debug, Default)]
    struct Fake {
        answer: Mutex<Option<Vec<SocketAddr>>>,
        hang: std::sync::atomic::AtomicBool,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl Fake {
        fn set(&self, answer: Option<Vec<SocketAddr>>) {
            *self.answer.lock() = answer;
        }

        fn lookups(&self) -> usize {
            self.lookups.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl Resolve for Fake {
        fn resolve(&self, _: &str, _: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.hang.load(std::sync::atomic::Ordering::Relaxed) {
                return Box::pin(futures::future::pending());
            }
            let answer = self.answer.lock().clone();
            Box::pin(async move { answer.ok_or_else(|| std::io::Error::other("no such name")) })
        }
    }

    fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn fixed(raw: &str) -> Target {
        let channel = channel::make_endpoint(raw, &ChannelOptions::default())
            .unwrap()
            .connect_lazy();
        Target::fixed(raw, channel)
    }

    fn name(raw: &str) -> Target {
        Target::name(raw, DnsName::parse(raw).unwrap().unwrap())
    }

    fn targets(list: Vec<Target>, fake: &Arc<Fake>) -> Targets {
        let opts = ChannelOptions {
            connect_timeout: TEST_TIMEOUT,
            ..ChannelOptions::default()
        };
        Targets::new(list, fake.clone(), opts)
    }

    /// The endpoints of the next `n` entries.
    async fn take(t: &mut Targets, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(t.next().await.expect("an entry").0.to_string());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn static_endpoints_rotate_in_order_without_lookups() {
        let fake = Arc::new(Fake::default());
        let mut t = targets(vec![fixed("http://a:1"), fixed("b:2")], &fake);
        assert_eq!(
            take(&mut t, 5).await,
            ["http://a:1", "b:2", "http://a:1", "b:2", "http://a:1"]
        );
        // A restart after a session on "http://a:1": the next one first, strict order after.
        t.restart();
        assert_eq!(
            take(&mut t, 4).await,
            ["b:2", "http://a:1", "b:2", "http://a:1"]
        );
        assert_eq!(fake.lookups(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_every_address_in_its_place_and_is_resolved_again_each_pass() {
        let fake = Arc::new(Fake::default());
        fake.set(Some(addrs(&[
            "127.0.0.3:4000",
            "[::1]:4000",
            "127.0.0.3:4000",
        ])));
        let mut t = targets(
            vec![
                fixed("http://s1:1"),
                name("dns:///dlb.test:4000"),
                fixed("http://s2:2"),
            ],
            &fake,
        );
        let pass = take(&mut t, 4).await;
        assert_eq!(fake.lookups(), 1, "one lookup per pass");
        assert_eq!(pass[0], "http://s1:1");
        assert_eq!(pass[3], "http://s2:2");
        // Deduplicated, each address its own endpoint, in a random order.
        let middle: BTreeSet<&str> = pass[1..3].iter().map(String::as_str).collect();
        assert_eq!(
            middle,
            BTreeSet::from(["http://127.0.0.3:4000", "http://[::1]:4000"])
        );
        // The pass is over: the next entry starts a new one, after a new lookup.
        fake.set(Some(addrs(&["127.0.0.9:4000"])));
        assert_eq!(
            take(&mut t, 3).await,
            ["http://s1:1", "http://127.0.0.9:4000", "http://s2:2"]
        );
        assert_eq!(fake.lookups(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_empty_lookup_keeps_the_previous_answer() {
        let fake = Arc::new(Fake::default());
        fake.set(Some(addrs(&["127.0.0.3:4000"])));
        let mut t = targets(vec![name("dns:///dlb.test:4000")], &fake);
        assert_eq!(take(&mut t, 1).await, ["http://127.0.0.3:4000"]);
        fake.set(None);
        assert_eq!(take(&mut t, 1).await, ["http://127.0.0.3:4000"]);
        fake.set(Some(Vec::new()));
        assert_eq!(take(&mut t, 1).await, ["http://127.0.0.3:4000"]);
        // A lookup that never answers is abandoned after the connect timeout.
        fake.hang.store(true, std::sync::atomic::Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        assert_eq!(take(&mut t, 1).await, ["http://127.0.0.3:4000"]);
        assert_eq!(started.elapsed(), TEST_TIMEOUT);
        assert_eq!(fake.lookups(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn without_any_address_the_pass_is_empty_and_each_ask_looks_up_again() {
        let fake = Arc::new(Fake::default());
        let mut t = targets(vec![name("dns:///a.test:1"), name("dns:b.test:2")], &fake);
        for round in 1..=3 {
            assert!(t.next().await.is_none());
            assert_eq!(fake.lookups(), 2 * round, "both names looked up each time");
        }
        fake.set(Some(Vec::new()));
        assert!(t.next().await.is_none());
        // Unknown names beside a static endpoint: the pass is the static endpoint alone.
        let mut t = targets(vec![name("dns:///a.test:1"), fixed("http://s:1")], &fake);
        assert_eq!(take(&mut t, 2).await, ["http://s:1", "http://s:1"]);
        fake.set(Some(addrs(&["10.0.0.1:1"])));
        assert_eq!(take(&mut t, 2).await, ["http://10.0.0.1:1", "http://s:1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_looks_up_again_and_puts_the_endpoint_left_last() {
        let fake = Arc::new(Fake::default());
        fake.set(Some(addrs(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])));
        let mut t = targets(vec![name("dns:///dlb.test:1")], &fake);
        let (left, _) = t.next().await.unwrap();
        t.restart();
        let pass = take(&mut t, 3).await;
        assert_eq!(fake.lookups(), 2);
        assert_eq!(pass[2], *left, "the endpoint left is tried last: {pass:?}");
        // An address gone from the answer is simply not in the new pass.
        fake.set(Some(addrs(&["10.0.0.4:1"])));
        t.restart();
        assert_eq!(
            take(&mut t, 2).await,
            ["http://10.0.0.4:1", "http://10.0.0.4:1"]
        );
    }

    /// After `GoingAway` the next entry is drawn among the others: never the one left, and
    /// over many draws every other one (a pile of sessions spreads instead of moving as one).
    #[tokio::test(start_paused = true)]
    async fn going_away_goes_to_a_random_other_endpoint() {
        let fake = Arc::new(Fake::default());
        let mut t = targets(
            vec![
                fixed("http://a:1"),
                fixed("http://b:1"),
                fixed("http://c:1"),
                fixed("http://d:1"),
            ],
            &fake,
        );
        let mut seen = BTreeSet::new();
        let mut left = t.next().await.unwrap().0.to_string();
        for _ in 0..300 {
            t.go_elsewhere();
            let now = t.next().await.unwrap().0.to_string();
            assert_ne!(now, left, "went back to the endpoint it left");
            seen.insert((left.clone(), now.clone()));
            left = now;
        }
        // 4 × 3 possible moves; 300 uniform draws miss one with probability < 1e-10.
        assert_eq!(seen.len(), 12, "{seen:?}");
        // A single endpoint: it is the only choice.
        let mut one = targets(vec![fixed("http://a:1")], &fake);
        one.next().await.unwrap();
        one.go_elsewhere();
        assert_eq!(&*one.next().await.unwrap().0, "http://a:1");
    }

    /// Each answer is shuffled: over many lookups of the same answer, the first address varies
    /// (the chance that 200 shuffles of 8 addresses all start alike is 8^-199).
    #[tokio::test(start_paused = true)]
    async fn each_answer_is_shuffled_and_capped() {
        let fake = Arc::new(Fake::default());
        let eight: Vec<String> = (1..=8).map(|i| format!("10.0.0.{i}:1")).collect();
        fake.set(Some(eight.iter().map(|a| a.parse().unwrap()).collect()));
        let mut t = targets(vec![name("dns:///dlb.test:1")], &fake);
        let mut firsts = BTreeSet::new();
        for _ in 0..200 {
            let pass = take(&mut t, 8).await;
            let distinct: BTreeSet<&String> = pass.iter().collect();
            assert_eq!(distinct.len(), 8, "every address once per pass");
            firsts.insert(pass[0].clone());
        }
        assert!(firsts.len() > 1, "never shuffled: {firsts:?}");
        let many: Vec<SocketAddr> = (0..1000u16)
            .map(|p| SocketAddr::from(([10, 0, 0, 1], 1000 + p)))
            .collect();
        fake.set(Some(many));
        t.restart();
        t.next().await.unwrap();
        assert_eq!(t.pass.len(), MAX_ADDRESSES);
    }
}
