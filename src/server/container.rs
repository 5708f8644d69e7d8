//! The container RPCs of the RuntimeService: CreateContainer, StartContainer, StopContainer,
//! RemoveContainer, ListContainers, ContainerStatus, UpdateContainerResources, ExecSync,
//! ReopenContainerLog. Thin: validation and mapping; the work is in
//! [`crate::container::manager`].

use std::collections::HashMap;

use crate::cri::v1 as cri;
use tonic::Status;

use crate::container::manager::{ContainerManager, ContainerRecord, Phase};
use crate::container::signal;

fn state_of(rec: &ContainerRecord) -> cri::ContainerState {
    match rec.phase {
        Phase::Creating | Phase::Created => cri::ContainerState::ContainerCreated,
        Phase::Running => cri::ContainerState::ContainerRunning,
        Phase::Exited => cri::ContainerState::ContainerExited,
    }
}

fn image_spec(rec: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: rec.image_name.clone(),
        user_specified_image: rec.image_name.clone(),
        ..Default::default()
    }
}

pub fn to_container(rec: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: rec.id.clone(),
        pod_sandbox_id: rec.sandbox_id.clone(),
        metadata: rec.config.metadata.clone(),
        image: Some(image_spec(rec)),
        image_ref: rec.image_ref.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        labels: rec.config.labels.clone(),
        annotations: rec.config.annotations.clone(),
        image_id: rec.image_id.clone(),
    }
}

/// The container's CRI mounts as configured; an image volume's `image.image_ref` tells which
/// image it got: its id, as PullImage answered it.
fn mounts(rec: &ContainerRecord) -> Vec<cri::Mount> {
    let mut mounts = rec.config.mounts.clone();
    for v in &rec.image_volumes {
        if let Some(image) = mounts.get_mut(v.index).and_then(|m| m.image.as_mut()) {
            image.image_ref = v.image_ref.clone();
        }
    }
    mounts
}

pub fn to_status(rec: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: rec.id.clone(),
        metadata: rec.config.metadata.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        exit_code: rec.exit_code,
        image: Some(image_spec(rec)),
        image_ref: rec.image_ref.clone(),
        reason: rec.reason.clone(),
        message: rec.message.clone(),
        labels: rec.config.labels.clone(),
        annotations: rec.config.annotations.clone(),
        mounts: mounts(rec),
        log_path: rec
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        resources: rec
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|r| cri::ContainerResources {
                linux: Some(r),
                ..Default::default()
            }),
        image_id: rec.image_id.clone(),
        user: rec.user.as_ref().map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(u.uid),
                gid: i64::from(u.gid),
                supplemental_groups: u.groups.iter().map(|g| i64::from(*g)).collect(),
            }),
        }),
        stop_signal: signal::to_cri(rec.stop_signal.unwrap_or(libc::SIGTERM)) as i32,
    }
}

pub async fn create(
    containers: &std::sync::Arc<ContainerManager>,
    req: cri::CreateContainerRequest,
) -> Result<cri::CreateContainerResponse, Status> {
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("a container config is required"))?;
    let rec = containers.create(&req.pod_sandbox_id, config).await?;
    Ok(cri::CreateContainerResponse {
        container_id: rec.id,
    })
}

pub fn status(
    containers: &ContainerManager,
    req: cri::ContainerStatusRequest,
) -> Result<cri::ContainerStatusResponse, Status> {
    let rec = containers.get(&req.container_id)?;
    let mut info = HashMap::new();
    if req.verbose {
        let spec: serde_json::Value = std::fs::read(rec.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let v = serde_json::json!({
            "pid": rec.pid,
            "sandboxID": rec.sandbox_id,
            "runtimeHandler": rec.runtime_handler,
            "cgroupsPath": rec.cgroups_path,
            "bundle": rec.bundle,
            "runtimeSpec": spec,
            "config": rec.config,
        });
        info.insert("info".to_string(), v.to_string());
    }
    Ok(cri::ContainerStatusResponse {
        status: Some(to_status(&rec)),
        info,
    })
}

pub fn list(
    containers: &ContainerManager,
    req: cri::ListContainersRequest,
) -> cri::ListContainersResponse {
    let filter = req.filter.unwrap_or_default();
    let items = containers.list_map(|r| {
        let wanted = (filter.id.is_empty() || r.id.starts_with(&filter.id))
            && (filter.pod_sandbox_id.is_empty()
                || r.sandbox_id.starts_with(&filter.pod_sandbox_id))
            && filter
                .state
                .as_ref()
                .is_none_or(|s| s.state == state_of(r) as i32)
            && super::labels_match(&filter.label_selector, &r.config.labels);
        wanted.then(|| to_container(r))
    });
    cri::ListContainersResponse { containers: items }
}

pub async fn exec_sync(
    containers: &ContainerManager,
    req: cri::ExecSyncRequest,
) -> Result<cri::ExecSyncResponse, Status> {
    let out = containers
        .exec_sync(&req.container_id, req.cmd, req.timeout)
        .await?;
    if out.timed_out {
        return Err(Status::deadline_exceeded(format!(
            "command timed out after {}s",
            req.timeout
        )));
    }
    Ok(cri::ExecSyncResponse {
        stdout: out.stdout,
        stderr: out.stderr,
        exit_code: out.exit_code,
    })
}
