//! `GetContainerEvents` through a real berthd and runc: two subscribers see the created,
//! started, stopped and deleted events of a pod and its container in order, with statuses;
//! an exit with nobody asking is pushed; an exit that happened while berthd was down is
//! reported once after the restart.

mod common;

use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, ImageBuilder, Registry};
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
    let reg = Registry::anonymous();
    let image = ImageBuilder::busybox().build();
    let image = reg.push("test/events", "1", &image).await.reference;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    common::pull_image(&mut ic, &image, None)
        .await
        .expect("pull");
    let rt = d.runtime_client().await;
    Env {
        _reg: reg,
        d,
        rt,
        image,
        logs: tempfile::tempdir().expect("log dir"),
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
    e.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    e.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove pod");
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

    e.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    e.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove pod");
}
