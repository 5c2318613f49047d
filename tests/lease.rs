//! Leases and leader election against the real control plane, with client-go's semantics: expiry is
//! judged from our own observation (never from the holder's clock), every request has a deadline,
//! and a holder that cannot renew stops before anyone else may take over.

mod support;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ObjectMeta;
use kube::{Client, Config};
use stash::controller::leader::run_while_leader;
use stash::lease::{LeaseConfig, LeaseLock};
use stash::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{TestNamespace, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const LEASE: &str = "test-lease";
const DURATION: Duration = Duration::from_secs(4);

fn config(ns: &TestNamespace, identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: ns.name.clone(),
        name: LEASE.into(),
        identity: identity.into(),
        duration: DURATION,
        renew_every: Duration::from_secs(1),
    }
}

/// Writes the Lease as `holder` would, with `renewTime` read from a clock `skew` away from ours.
async fn stamp(leases: &Api<Lease>, holder: &str, skew: SignedDuration) {
    let time = MicroTime(Timestamp::now().checked_add(skew).expect("a representable time"));
    let lease = Lease {
        metadata: ObjectMeta { name: Some(LEASE.into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(4),
            acquire_time: Some(time.clone()),
            renew_time: Some(time),
            ..Default::default()
        }),
    };
    leases.patch(LEASE, &PatchParams::apply(holder).force(), &Patch::Apply(&lease)).await.expect("Lease written");
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt(LEASE).await.ok().flatten()?.spec?.holder_identity
}

/// When something first happened, once it has.
#[derive(Clone, Default)]
struct Moment(Arc<Mutex<Option<Instant>>>);

impl Moment {
    fn mark(&self) {
        if let Ok(mut at) = self.0.lock() {
            at.get_or_insert_with(Instant::now);
        }
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().expect("not poisoned")
    }
}

/// Marks when it is dropped: a holder's work stopping, whether it returned or was aborted.
struct MarkOnDrop(Moment);

impl Drop for MarkOnDrop {
    fn drop(&mut self) {
        self.0.mark();
    }
}

#[tokio::test]
async fn a_live_lease_stamped_by_a_clock_running_behind_is_not_taken_over() {
    let ns = TestNamespace::new("lease-past").await;
    let leases = ns.api::<Lease>();
    stamp(&leases, "ghost", SignedDuration::from_secs(-60)).await;
    // The holder renews every second; its clock is a minute behind ours.
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                stamp(&leases, "ghost", SignedDuration::from_secs(-60)).await;
            }
        })
    };
    let lock = LeaseLock::new(ns.client.clone(), config(&ns, "me"));
    let attempt = tokio::time::timeout(DURATION * 2, lock.hold_while(async {})).await;
    renewing.abort();
    assert!(attempt.is_err(), "took over a Lease that its holder renews every second");
    assert_eq!(holder(&leases).await.as_deref(), Some("ghost"));
}

#[tokio::test]
async fn an_abandoned_lease_stamped_by_a_clock_running_ahead_is_taken_over_after_our_own_observation() {
    let ns = TestNamespace::new("lease-future").await;
    let leases = ns.api::<Lease>();
    // Nobody renews it, but its renewTime is a minute ahead of our clock.
    stamp(&leases, "ghost", SignedDuration::from_secs(60)).await;
    let lock = LeaseLock::new(ns.client.clone(), config(&ns, "me"));
    let started = Instant::now();
    let taken = tokio::time::timeout(Duration::from_secs(15), lock.hold_while(async { started.elapsed() }))
        .await
        .expect("taken over within 15 s, not after the holder's clock says so")
        .expect("no API error");
    println!("abandoned Lease taken over after {taken:?}");
    assert!(taken >= DURATION, "taken over after {taken:?}, before a whole leaseDuration of our observation");
    assert!(taken < DURATION + Duration::from_secs(3), "taken over only after {taken:?}");
}

#[tokio::test]
async fn hold_while_stops_the_work_when_the_lease_is_taken() {
    let ns = TestNamespace::new("lease-hold").await;
    let leases = ns.api::<Lease>();
    let stopped = Moment::default();
    let lock = LeaseLock::new(ns.client.clone(), config(&ns, "me"));
    let work = {
        let clock = MarkOnDrop(stopped.clone());
        async move {
            let _clock = clock;
            std::future::pending::<()>().await;
        }
    };
    let holding = tokio::spawn(async move { lock.hold_while(work).await.map_err(|e| e.to_string()) });
    eventually("the work to hold the Lease", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move { holder(&leases).await.filter(|h| h == "me") }
    })
    .await;
    stamp(&leases, "usurper", SignedDuration::ZERO).await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), holding).await;
    assert!(stopped.get().is_some(), "the work carried on after the Lease was taken");
    let outcome = outcome.expect("hold_while returned").expect("not panicked");
    assert!(outcome.is_err(), "the loss is reported, not a normal end of the work");
}

/// A TCP relay to the API server that can freeze: it then forwards nothing and keeps every
/// connection open, like a half-open connection (kube's client has no read timeout).
struct Relay {
    addr: SocketAddr,
    frozen: CancellationToken,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let frozen = CancellationToken::new();
        let gate = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    if gate.is_cancelled() {
                        let _held = inbound;
                        return std::future::pending::<()>().await;
                    }
                    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::spawn(pump(in_read, out_write, gate.clone()));
                    tokio::spawn(pump(out_read, in_write, gate));
                });
            }
        });
        Relay { addr, frozen }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            _ = frozen.cancelled() => break,
            read = from.read(&mut buf) => read,
        };
        match read {
            Ok(n) if n > 0 && !frozen.is_cancelled() => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(0) | Err(_) => return,
            Ok(_) => break,
        }
    }
    let _held = (from, to);
    std::future::pending::<()>().await;
}

/// A client for the test cluster that talks to it through `relay`.
async fn client_through(relay: &Relay, upstream: &Config) -> Client {
    let mut config = upstream.clone();
    config.cluster_url = format!("https://{}", relay.addr).parse().expect("a URL");
    Client::try_from(config).expect("a client")
}

async fn cluster_config() -> Config {
    let kubeconfig = Kubeconfig::read_from(&support::cluster().kubeconfig).expect("kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("a valid kubeconfig")
}

fn upstream_addr(config: &Config) -> SocketAddr {
    let authority = config.cluster_url.authority().expect("the API server's address").as_str().to_string();
    authority.parse().expect("an IP:port API server address")
}

/// Leads under `identity` with work that ignores its cancellation token (a reconcile stuck in a
/// hook); returns when the work started and when it was dropped.
fn contender(
    client: Client,
    config: LeaseConfig,
    cancel: CancellationToken,
) -> (Moment, Moment, tokio::task::JoinHandle<()>) {
    let (started, stopped) = (Moment::default(), Moment::default());
    let lead = {
        let (started, stopped) = (started.clone(), stopped.clone());
        move |_token: CancellationToken| {
            let clock = MarkOnDrop(stopped.clone());
            started.mark();
            async move {
                let _clock = clock;
                std::future::pending::<()>().await;
            }
        }
    };
    let task = tokio::spawn(run_while_leader(client, config, Arc::new(Metrics::default()), cancel, lead));
    (started, stopped, task)
}

#[tokio::test]
async fn a_leader_whose_renewals_hang_stops_leading_before_another_takes_over() {
    let ns = TestNamespace::new("lease-hang").await;
    let upstream = cluster_config().await;
    let relay = Relay::start(upstream_addr(&upstream)).await;
    let cancel = CancellationToken::new();
    let (a_started, a_stopped, a_task) =
        contender(client_through(&relay, &upstream).await, config(&ns, "a"), cancel.clone());
    eventually("a to lead", Duration::from_secs(30), || async { a_started.get() }).await;
    let (b_started, _, b_task) = contender(ns.client.clone(), config(&ns, "b"), cancel.clone());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(b_started.get().is_none(), "b took over a Lease that a renews");

    let frozen = Instant::now();
    relay.frozen.cancel();
    let b_leads = eventually("b to take over", Duration::from_secs(30), || async { b_started.get() }).await;
    let a_stops = a_stopped.get();
    cancel.cancel();
    a_task.abort();
    b_task.abort();
    let a_stops = a_stops.expect("a still leads while b leads: two leaders");
    println!("a stopped {:?} after the freeze, b led after {:?}", a_stops - frozen, b_leads - frozen);
    assert!(a_stops < b_leads, "a stopped only after b took over");
    assert!(a_stops - frozen < DURATION, "a stopped {:?} after its renewals hung", a_stops - frozen);
}

#[tokio::test]
async fn a_leader_whose_controllers_end_releases_the_lease_and_contends_again() {
    let ns = TestNamespace::new("lease-zombie").await;
    let leases = ns.api::<Lease>();
    let runs = Arc::new(AtomicUsize::new(0));
    let lead = {
        let runs = runs.clone();
        move |_token: CancellationToken| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(run > 0, "the controllers crashed");
                std::future::pending::<()>().await;
            }
        }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_while_leader(
        ns.client.clone(),
        config(&ns, "a"),
        Arc::new(Metrics::default()),
        cancel.clone(),
        lead,
    ));
    eventually("the controllers to be restarted", Duration::from_secs(15), || async {
        (runs.load(Ordering::SeqCst) > 1).then_some(())
    })
    .await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let transitions = leases.get(LEASE).await.expect("the Lease").spec.and_then(|s| s.lease_transitions);
    assert!(transitions >= Some(1), "the crashed leader never released the Lease ({transitions:?} transitions)");
}
