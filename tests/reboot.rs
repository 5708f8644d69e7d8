//! A reboot, simulated (issue #11): berthd is killed, and so is everything a reboot ends —
//! the pod's processes (container, monitor, pod init), every mount under `state` (pinned
//! namespaces, rootfs) and `state` itself (a tmpfs such as /run). `root` survives. After the
//! restart the pod is NotReady and its container Exited, StopPodSandbox and RemovePodSandbox
//! work (there is no pod directory or bundle left to mark), the name is free again and nothing
//! is left.

mod common;

use berth::cri::v1 as cri;
use common::*;

#[tokio::test]
async fn after_a_reboot_pods_and_containers_are_reported_stopped_and_removable() {
    let BusyboxDaemon {
        reg: _reg,
        mut d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/reboot", BerthdConfig::new()).await;
    let pod = run_pod(&mut rt, plain_pod_config("rb", "test", logs.path()), "").await;
    let c = create_container(
        &mut rt,
        &pod,
        sh_container("one", &image, "exec sleep 3600"),
    )
    .await
    .expect("create");
    start_container(&mut rt, &c).await.expect("start");
    drop(rt);

    d.kill9();
    kill_leftovers(d.dir());
    unmount_all_under(&d.state());
    std::fs::remove_dir_all(d.state()).expect("empty state, as a reboot does");
    d.restart().await;

    let mut rt = d.runtime_client().await;
    let pods = list_pods(&mut rt).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxNotready as i32);
    let s = container_status(&mut rt, &c).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );

    remove_pod(&mut rt, &pod).await;
    let left = list_containers(&mut rt).await;
    assert!(left.is_empty(), "{left:?}");
    let again = run_pod(&mut rt, plain_pod_config("rb", "test", logs.path()), "").await;
    remove_pod(&mut rt, &again).await;
    assert!(
        mounts_under(d.dir()).is_empty(),
        "{:?}",
        mounts_under(d.dir())
    );
    let layers: Vec<_> = std::fs::read_dir(d.root().join("containers"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(layers.is_empty(), "writable layers left: {layers:?}");
}
