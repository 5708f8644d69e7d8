//! Small helpers around the CRI clients: images (pull, status, list, remove) and the pod and
//! container steps every integration test repeats (run a pod, create and start a
//! `sh -c` container, wait for its log, stop and remove the pod).

use base64::Engine as _;
use berth::cri::v1::image_service_client::ImageServiceClient;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use berth::cri::v1::{
    AuthConfig, Image, ImageFilter, ImageFsInfoRequest, ImageSpec, ImageStatusRequest,
    ListImagesRequest, PullImageRequest, RemoveImageRequest,
};
use serde_json::Value;
use tonic::transport::Channel;

pub type ImageClient = ImageServiceClient<Channel>;
pub type RuntimeClient = RuntimeServiceClient<Channel>;

/// `ImageSpec { image }`.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// `AuthConfig` with `username` and `password`.
pub fn auth_user_password(user: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: user.to_string(),
        password: password.to_string(),
        ..Default::default()
    }
}

/// `AuthConfig` with only the `auth` field (`base64(user:password)`), as the kubelet
/// passes docker config credentials.
pub fn auth_base64(user: &str, password: &str) -> AuthConfig {
    AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
        ..Default::default()
    }
}

/// PullImage; returns `image_ref`.
pub async fn pull_image(
    client: &mut ImageClient,
    image: &str,
    auth: Option<AuthConfig>,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// ImageStatus (not verbose); `None` when the image is unknown. Panics on RPC errors.
pub async fn image_status(client: &mut ImageClient, image: &str) -> Option<Image> {
    client
        .image_status(ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        })
        .await
        .unwrap_or_else(|e| panic!("ImageStatus({image}) failed: {e}"))
        .into_inner()
        .image
}

/// Verbose ImageStatus: the image and `info["info"]` parsed as JSON (`Null` when absent).
pub async fn image_status_verbose(client: &mut ImageClient, image: &str) -> (Option<Image>, Value) {
    let resp = client
        .image_status(ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: true,
        })
        .await
        .unwrap_or_else(|e| panic!("ImageStatus({image}, verbose) failed: {e}"))
        .into_inner();
    let info = resp
        .info
        .get("info")
        .map(|s| {
            serde_json::from_str(s)
                .unwrap_or_else(|e| panic!("info[\"info\"] of {image} is not JSON: {e}: {s}"))
        })
        .unwrap_or(Value::Null);
    (resp.image, info)
}

/// ListImages, optionally filtered by an image reference/id.
pub async fn list_images(client: &mut ImageClient, filter: Option<&str>) -> Vec<Image> {
    client
        .list_images(ListImagesRequest {
            filter: filter.map(|f| ImageFilter {
                image: Some(image_spec(f)),
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("ListImages({filter:?}) failed: {e}"))
        .into_inner()
        .images
}

/// RemoveImage.
pub async fn remove_image(client: &mut ImageClient, image: &str) -> Result<(), tonic::Status> {
    client
        .remove_image(RemoveImageRequest {
            image: Some(image_spec(image)),
        })
        .await
        .map(|_| ())
}

/// ImageFsInfo: `(used_bytes, inodes_used)` summed over the image filesystems.
pub async fn image_fs_usage(client: &mut ImageClient) -> (u64, u64) {
    let resp = client
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap_or_else(|e| panic!("ImageFsInfo failed: {e}"))
        .into_inner();
    let mut bytes = 0;
    let mut inodes = 0;
    for fs in &resp.image_filesystems {
        bytes += fs.used_bytes.as_ref().map(|v| v.value).unwrap_or(0);
        inodes += fs.inodes_used.as_ref().map(|v| v.value).unwrap_or(0);
    }
    (bytes, inodes)
}

/// Paths in `info["snapshotDirs"]`, lowest layer first.
pub fn snapshot_dirs(info: &Value) -> Vec<std::path::PathBuf> {
    info["snapshotDirs"]
        .as_array()
        .unwrap_or_else(|| panic!("verbose info has no snapshotDirs list: {info}"))
        .iter()
        .map(|v| {
            std::path::PathBuf::from(
                v.as_str()
                    .unwrap_or_else(|| panic!("snapshotDirs entry is not a string: {v}")),
            )
        })
        .collect()
}

/// A container running `sh -c script` from `image`, logging to `<name>.log` in the pod's log
/// dir.
pub fn sh_container(name: &str, image: &str, script: &str) -> berth::cri::v1::ContainerConfig {
    use berth::cri::v1 as cri;
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// A plain pod: metadata `name` in `namespace` (uid `<name>-uid`), logging to `log_dir`.
pub fn plain_pod_config(
    name: &str,
    namespace: &str,
    log_dir: &std::path::Path,
) -> berth::cri::v1::PodSandboxConfig {
    use berth::cri::v1 as cri;
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// RunPodSandbox; panics when it fails.
pub async fn run_pod(
    rt: &mut RuntimeClient,
    config: berth::cri::v1::PodSandboxConfig,
    handler: &str,
) -> String {
    rt.run_pod_sandbox(berth::cri::v1::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: handler.into(),
    })
    .await
    .expect("run pod")
    .into_inner()
    .pod_sandbox_id
}

/// CreateContainer in `pod`.
pub async fn create_container(
    rt: &mut RuntimeClient,
    pod: &str,
    config: berth::cri::v1::ContainerConfig,
) -> Result<String, tonic::Status> {
    rt.create_container(berth::cri::v1::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// StartContainer.
pub async fn start_container(rt: &mut RuntimeClient, id: &str) -> Result<(), tonic::Status> {
    rt.start_container(berth::cri::v1::StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .map(|_| ())
}

/// Every pod sandbox (ListPodSandbox without a filter); panics when it fails.
pub async fn list_pods(rt: &mut RuntimeClient) -> Vec<berth::cri::v1::PodSandbox> {
    rt.list_pod_sandbox(berth::cri::v1::ListPodSandboxRequest::default())
        .await
        .expect("list pods")
        .into_inner()
        .items
}

/// Every container (ListContainers without a filter); panics when it fails.
pub async fn list_containers(rt: &mut RuntimeClient) -> Vec<berth::cri::v1::Container> {
    rt.list_containers(berth::cri::v1::ListContainersRequest::default())
        .await
        .expect("list containers")
        .into_inner()
        .containers
}

/// ContainerStatus (not verbose); panics when it fails.
pub async fn container_status(rt: &mut RuntimeClient, id: &str) -> berth::cri::v1::ContainerStatus {
    rt.container_status(berth::cri::v1::ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: false,
    })
    .await
    .expect("container status")
    .into_inner()
    .status
    .expect("a status")
}

/// StopPodSandbox then RemovePodSandbox; panics when either fails.
pub async fn remove_pod(rt: &mut RuntimeClient, pod: &str) {
    rt.stop_pod_sandbox(berth::cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("stop pod");
    rt.remove_pod_sandbox(berth::cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("remove pod");
}

/// Waits (up to 20 s) until the log at `path` contains `needle`; returns the log.
pub async fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} never reached {}: {text:?}",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every message of a server stream (or the status that ended it).
pub async fn collect_stream<T>(
    s: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<Vec<T>, tonic::Status> {
    let mut s = s?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// What most CRI tests start from: a berthd (with `config`, trusting the registry) whose
/// registry holds a busybox image as `<repo>:1`, pulled already; a runtime client; a log
/// directory for pods.
pub struct BusyboxDaemon {
    pub reg: super::Registry,
    pub d: super::Berthd,
    pub rt: RuntimeClient,
    pub image: String,
    pub logs: tempfile::TempDir,
}

/// Starts a [`BusyboxDaemon`].
pub async fn busybox_daemon(repo: &str, config: super::BerthdConfig) -> BusyboxDaemon {
    let reg = super::Registry::anonymous();
    let image = reg
        .push(repo, "1", &super::ImageBuilder::busybox().build())
        .await
        .reference;
    let d = super::Berthd::start(config.trust(&reg)).await;
    let mut ic = d.image_client().await;
    pull_image(&mut ic, &image, None).await.expect("pull");
    let rt = d.runtime_client().await;
    BusyboxDaemon {
        reg,
        d,
        rt,
        image,
        logs: tempfile::tempdir().expect("log dir"),
    }
}
