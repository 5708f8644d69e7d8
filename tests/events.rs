//! `GetContainerEvents` through a real berthd and runc: two subscribers see the created,
//! started, stopped and deleted events of a pod and its container in order, with statuses;
//! an exit with nobody asking is pushed; an exit that happened while berthd was down is
//! reported once after the restart; a subscriber that never reads is dropped while the
//! runtime goes on and a reading subscriber still gets everything in order; a container that
//! the startup repair removes (left half-made by a crash) yields a deleted event.

mod common;

use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, Registry};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;
type Events = tonic::Streaming<cri::ContainerEventResponse>;

use cri::ContainerEventType as T;

struct Env {
    _reg: Registry,
    d: Berthd,
    rt: Rt,
    image: String,
    logs: tempfile::TempDir,
}

async fn env() -> Env {
    env_with(BerthdConfig::new()).await
}

async fn env_with(config: BerthdConfig) -> Env {
    let b = common::busybox_daemon("test/events", config).await;
    Env {
        _reg: b.reg,
        d: b.d,
        rt: b.rt,
        image: b.image,
        logs: b.logs,
    }
}

impl Env {
    async fn pod(&mut self, name: &str) -> String {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "events".into(),
                attempt: 0,
            }),
            log_directory: self.logs.path().display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        common::run_pod(&mut self.rt, config, "").await
    }

    async fn create(&mut self, pod: &str, name: &str, script: &str) -> String {
        let config = common::sh_container(name, &self.image, script);
        common::create_container(&mut self.rt, pod, config)
            .await
            .expect("create")
    }

    async fn start(&mut self, id: &str) {
        common::start_container(&mut self.rt, id)
            .await
            .expect("start");
    }

    async fn subscribe(&mut self) -> Events {
        self.rt
            .get_container_events(cri::GetEventsRequest {})
            .await
            .expect("subscribe")
            .into_inner()
    }
}

/// The next event within 20 s.
async fn next(s: &mut Events) -> cri::ContainerEventResponse {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("an event within 20s")
        .expect("stream ok")
        .expect("stream open")
}

fn kind(e: &cri::ContainerEventResponse) -> T {
    T::try_from(e.container_event_type).expect("known type")
}

fn state_of(e: &cri::ContainerEventResponse, id: &str) -> Option<cri::ContainerState> {
    e.containers_statuses
        .iter()
        .find(|s| s.id == id)
        .map(|s| cri::ContainerState::try_from(s.state).expect("state"))
}

/// Two subscribers each see the whole lifecycle in order; each event carries the pod's
/// status and the container's status as of that event.
#[tokio::test]
async fn two_subscribers_see_the_lifecycle_in_order() {
    let mut e = env().await;
    let mut a = e.subscribe().await;
    let mut b = e.subscribe().await;
    let pod = e.pod("lifecycle").await;
    let c = e.create(&pod, "c", "sleep 100000").await;
    e.start(&c).await;
    e.rt.stop_container(cri::StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .expect("stop");
    e.rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("remove");
    common::remove_pod(&mut e.rt, &pod).await;
    let want = [
        (&pod, T::ContainerCreatedEvent),
        (&pod, T::ContainerStartedEvent),
        (&c, T::ContainerCreatedEvent),
        (&c, T::ContainerStartedEvent),
        (&c, T::ContainerStoppedEvent),
        (&c, T::ContainerDeletedEvent),
        (&pod, T::ContainerStoppedEvent),
        (&pod, T::ContainerDeletedEvent),
    ];
    for s in [&mut a, &mut b] {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(next(s).await);
        }
        let seen: Vec<(String, T)> = got
            .iter()
            .map(|e| (e.container_id.clone(), kind(e)))
            .collect();
        let expected: Vec<(String, T)> = want.iter().map(|(i, k)| ((*i).clone(), *k)).collect();
        assert_eq!(seen, expected);
        let mut last = 0;
        for ev in &got {
            assert!(ev.created_at >= last, "timestamps in order");
            last = ev.created_at;
        }
        // Statuses as of each event.
        assert_eq!(
            state_of(&got[2], &c),
            Some(cri::ContainerState::ContainerCreated)
        );
        assert_eq!(
            state_of(&got[3], &c),
            Some(cri::ContainerState::ContainerRunning)
        );
        assert_eq!(
            state_of(&got[4], &c),
            Some(cri::ContainerState::ContainerExited)
        );
        assert_eq!(state_of(&got[5], &c), None, "deleted: no longer listed");
        let pod_state = |i: usize| {
            got[i]
                .pod_sandbox_status
                .as_ref()
                .map(|p| cri::PodSandboxState::try_from(p.state).expect("pod state"))
        };
        assert_eq!(pod_state(0), Some(cri::PodSandboxState::SandboxReady));
        assert_eq!(pod_state(6), Some(cri::PodSandboxState::SandboxNotready));
        assert_eq!(pod_state(7), None, "the pod is gone");
    }
}

/// A container that exits on its own gets its stopped event without any RPC asking; one that
/// exits while berthd is down is reported after the restart, once.
#[tokio::test]
async fn exits_are_pushed_and_an_exit_while_down_is_reported_after_restart() {
    let mut e = env().await;
    let pod = e.pod("exits").await;
    let mut s = e.subscribe().await;
    let quick = e.create(&pod, "quick", "exit 3").await;
    e.start(&quick).await;
    let mut stopped = None;
    while stopped.is_none() {
        let ev = next(&mut s).await;
        if ev.container_id == quick && kind(&ev) == T::ContainerStoppedEvent {
            stopped = Some(ev);
        }
    }
    let ev = stopped.expect("stopped");
    let st = ev
        .containers_statuses
        .iter()
        .find(|c| c.id == quick)
        .expect("its status");
    assert_eq!(st.exit_code, 3);

    let later = e.create(&pod, "later", "sleep 2; exit 7").await;
    e.start(&later).await;
    e.d.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let mut s = e.subscribe().await;
    let ev = next(&mut s).await;
    assert_eq!(ev.container_id, later);
    assert_eq!(kind(&ev), T::ContainerStoppedEvent);
    let st = ev
        .containers_statuses
        .iter()
        .find(|c| c.id == later)
        .expect("its status");
    assert_eq!(st.exit_code, 7);
    // Reported once: after another restart nothing is replayed.
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let mut s = e.subscribe().await;
    let none = tokio::time::timeout(Duration::from_secs(1), s.message()).await;
    assert!(none.is_err(), "nothing to report: {none:?}");

    common::remove_pod(&mut e.rt, &pod).await;
}

/// A subscriber on a connection with the smallest HTTP/2 windows, so that what it does not
/// read backs up to berthd quickly (the default windows hold megabytes).
async fn tight_subscriber(d: &Berthd) -> Events {
    let path = d.socket();
    let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    RuntimeServiceClient::new(ch)
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner()
}

/// With `[events] subscriber_buffer = 16`, a subscriber that never reads falls behind and is
/// dropped (berthd logs it; when it reads at last, it gets what was buffered, in order, then
/// `ResourceExhausted`), while containers go on being created, started and removed, and a
/// subscriber that reads gets every event of every container in order.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_dropped_and_the_runtime_goes_on() {
    let mut e = env_with(BerthdConfig::new().table("[events]\nsubscriber_buffer = 16")).await;
    let mut slow = tight_subscriber(&e.d).await;
    let mut fast = e.subscribe().await;
    let pod = e.pod("flood").await;
    // The reading subscriber: every event until the pod's deleted one.
    let pod_id = pod.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), fast.message()).await {
                Ok(Ok(Some(ev))) => {
                    let done = ev.container_id == pod_id && kind(&ev) == T::ContainerDeletedEvent;
                    got.push(ev);
                    if done {
                        return Ok(got);
                    }
                }
                Ok(Ok(None)) => return Err(format!("stream ended after {} events", got.len())),
                Ok(Err(s)) => return Err(format!("{s} after {} events", got.len())),
                Err(_) => return Err(format!("no event for 60s after {} events", got.len())),
            }
        }
    });
    let mut made = Vec::new();
    // Until berthd has dropped the slow subscriber (at most 150 containers).
    for n in 0..150 {
        let c = e.create(&pod, &format!("c{n}"), "sleep 100000").await;
        e.start(&c).await;
        e.rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.clone(),
        })
        .await
        .expect("remove while a subscriber does not read");
        made.push(c);
        if e.d.log().contains("an events subscriber fell behind") {
            break;
        }
    }
    assert!(
        e.d.log().contains("an events subscriber fell behind"),
        "the slow subscriber was never dropped after {} containers",
        made.len()
    );
    println!("slow subscriber dropped after {} containers", made.len());
    // One more container after the drop: the runtime and the reading subscriber carry on.
    let after = e.create(&pod, "after", "sleep 100000").await;
    e.start(&after).await;
    common::remove_pod(&mut e.rt, &pod).await;

    // The slow one reads at last: what was buffered, in order, then the error.
    let mut slow_got = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), slow.message())
            .await
            .expect("the slow stream answers")
        {
            Ok(Some(ev)) => slow_got.push(ev),
            Ok(None) => panic!("ended without an error after {} events", slow_got.len()),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    println!(
        "the slow subscriber got {} events, then: {status}",
        slow_got.len()
    );
    let mut last = 0;
    for ev in &slow_got {
        assert!(ev.created_at >= last, "buffered events in order");
        last = ev.created_at;
    }

    // The reading subscriber saw every container's whole lifecycle, in order.
    let got = reader
        .await
        .expect("reader task")
        .expect("the reading subscriber");
    let seen: Vec<(String, T)> = got
        .iter()
        .map(|ev| (ev.container_id.clone(), kind(ev)))
        .collect();
    let mut want = vec![
        (pod.clone(), T::ContainerCreatedEvent),
        (pod.clone(), T::ContainerStartedEvent),
    ];
    for c in &made {
        for k in [
            T::ContainerCreatedEvent,
            T::ContainerStartedEvent,
            T::ContainerStoppedEvent,
            T::ContainerDeletedEvent,
        ] {
            want.push((c.clone(), k));
        }
    }
    // StopPodSandbox stops its container, then the pod; RemovePodSandbox removes both.
    want.extend([
        (after.clone(), T::ContainerCreatedEvent),
        (after.clone(), T::ContainerStartedEvent),
        (after.clone(), T::ContainerStoppedEvent),
        (pod.clone(), T::ContainerStoppedEvent),
        (after.clone(), T::ContainerDeletedEvent),
        (pod.clone(), T::ContainerDeletedEvent),
    ]);
    assert_eq!(
        seen.len(),
        want.len(),
        "every event reached the reading subscriber"
    );
    assert_eq!(seen, want);
    assert!(
        slow_got.len() < want.len(),
        "the slow subscriber missed events ({} of {})",
        slow_got.len(),
        want.len()
    );
}

/// A container that a crash left half-made (its record still `Creating`, as a berthd killed
/// inside CreateContainer leaves it; here the record is set back while berthd is down) is
/// removed by the startup repair, and the first subscriber after the restart gets its deleted
/// event, with its pod's status.
#[tokio::test]
async fn a_container_the_startup_repair_removes_yields_a_deleted_event() {
    use berth::container::manager::{ContainerRecord, Phase};
    use berth::store::{Batch, Store, Table};
    let mut e = env().await;
    let pod = e.pod("repair").await;
    let half = e.create(&pod, "half", "sleep 100000").await;
    e.d.kill9();
    {
        let store = Store::open(&e.d.root().join("berth.redb")).expect("open the store");
        let mut rec: ContainerRecord = store
            .get(Table::Containers, &half)
            .expect("read the record")
            .expect("the container's record");
        rec.phase = Phase::Creating;
        let mut b = Batch::new();
        b.put(Table::Containers, &half, &rec).expect("encode");
        store.commit_blocking(b).expect("commit");
    }
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let mut s = e.subscribe().await;
    let mut seen = Vec::new();
    let deleted = loop {
        let ev = next(&mut s).await;
        if ev.container_id == half && kind(&ev) == T::ContainerDeletedEvent {
            break ev;
        }
        seen.push((ev.container_id.clone(), kind(&ev)));
        assert!(seen.len() < 10, "no deleted event for {half}: {seen:?}");
    };
    assert_eq!(
        deleted
            .pod_sandbox_status
            .as_ref()
            .map(|p| p.id.clone())
            .as_deref(),
        Some(pod.as_str()),
        "with its pod's status"
    );
    assert!(state_of(&deleted, &half).is_none(), "no longer listed");
    let listed = common::list_containers(&mut e.rt).await;
    assert!(listed.iter().all(|c| c.id != half), "the repair removed it");
    common::remove_pod(&mut e.rt, &pod).await;
}
