//! The pod sandbox RPCs of the RuntimeService: RunPodSandbox, StopPodSandbox,
//! RemovePodSandbox, PodSandboxStatus, ListPodSandbox, UpdatePodSandboxResources,
//! UpdateRuntimeConfig. Thin: validation
//! and mapping; the work is in [`crate::sandbox`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::cri::v1 as cri;
use tonic::Status;

use super::trace::detached;
use crate::config::Config;
use crate::container::manager::ContainerManager;
use crate::sandbox::{Phase, SandboxManager, SandboxRecord, namespace_options};

fn state_of(rec: &SandboxRecord) -> cri::PodSandboxState {
    match rec.phase {
        Phase::Ready => cri::PodSandboxState::SandboxReady,
        Phase::Creating | Phase::NotReady => cri::PodSandboxState::SandboxNotready,
    }
}

fn labels(rec: &SandboxRecord) -> HashMap<String, String> {
    rec.config.labels.clone()
}

pub fn to_pod_sandbox(rec: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: rec.id.clone(),
        metadata: rec.config.metadata.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        labels: labels(rec),
        annotations: rec.config.annotations.clone(),
        runtime_handler: rec.reported_runtime_handler().to_string(),
    }
}

pub fn to_status(rec: &SandboxRecord) -> cri::PodSandboxStatus {
    let network = rec.network.as_ref().map(|n| {
        let mut ips = n.ips.iter().map(|ip| ip.to_string());
        cri::PodSandboxNetworkStatus {
            ip: ips.next().unwrap_or_default(),
            additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
        }
    });
    cri::PodSandboxStatus {
        id: rec.id.clone(),
        metadata: rec.config.metadata.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        network: Some(network.unwrap_or_default()),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(namespace_options(rec)),
            }),
        }),
        labels: labels(rec),
        annotations: rec.config.annotations.clone(),
        runtime_handler: rec.reported_runtime_handler().to_string(),
    }
}

/// The `verbose` info of PodSandboxStatus: pid, namespaces, files, the config.
pub fn verbose_info(rec: &SandboxRecord) -> HashMap<String, String> {
    let v = serde_json::json!({
        "pid": rec.init.map(|i| i.pid).unwrap_or(0),
        "netns": rec.netns_path(),
        "ipcns": rec.ipcns_path(),
        "utsns": rec.utsns_path(),
        "hostname": rec.hostname,
        "hostsPath": rec.hosts_path(),
        "resolvConfPath": rec.resolv_conf_path(),
        "runtimeHandler": rec.runtime_handler,
        "network": rec.network,
        "config": rec.config,
    });
    HashMap::from([("info".to_string(), v.to_string())])
}

/// The RuntimeClass handler a request names, checked against the configured runtimes.
pub fn runtime_handler(config: &Config, requested: &str) -> Result<String, Status> {
    let name = if requested.is_empty() {
        config.default_runtime.clone()
    } else {
        requested.to_string()
    };
    if !config.runtimes.contains_key(&name) {
        return Err(Status::invalid_argument(format!(
            "unknown runtime handler {name:?}: configured are {:?}",
            config.runtimes.keys().collect::<Vec<_>>()
        )));
    }
    Ok(name)
}

pub async fn run(
    sandboxes: &Arc<SandboxManager>,
    containers: &Arc<ContainerManager>,
    config: &Config,
    req: cri::RunPodSandboxRequest,
) -> Result<cri::RunPodSandboxResponse, Status> {
    let handler = runtime_handler(config, &req.runtime_handler)?;
    let pod_config = req
        .config
        .ok_or_else(|| Status::invalid_argument("a pod sandbox config is required"))?;
    let (sandboxes, containers) = (Arc::clone(sandboxes), Arc::clone(containers));
    let rec = detached(async move {
        let rec = sandboxes
            .run(pod_config, handler, req.runtime_handler)
            .await?;
        // Its first container need not wait for the monitor's launch.
        containers.start_monitor_ahead(&rec);
        Ok(rec)
    })
    .await?;
    Ok(cri::RunPodSandboxResponse {
        pod_sandbox_id: rec.id,
    })
}

pub async fn status(
    sandboxes: &SandboxManager,
    req: cri::PodSandboxStatusRequest,
) -> Result<cri::PodSandboxStatusResponse, Status> {
    let rec = sandboxes.get(&req.pod_sandbox_id)?;
    Ok(cri::PodSandboxStatusResponse {
        status: Some(to_status(&rec)),
        info: if req.verbose {
            verbose_info(&rec)
        } else {
            HashMap::new()
        },
        // Filled by the RuntimeService, which knows the containers.
        containers_statuses: vec![],
        timestamp: 0,
    })
}

pub async fn update_resources(
    sandboxes: &SandboxManager,
    config: &Config,
    req: cri::UpdatePodSandboxResourcesRequest,
) -> Result<cri::UpdatePodSandboxResourcesResponse, Status> {
    let rec = sandboxes.get(&req.pod_sandbox_id)?;
    // NRI plugins may refuse the change; they hear of it once applied.
    let nri = sandboxes.nri();
    let nri_pod = nri.active().then(|| crate::nri::convert::pod(&rec));
    if let Some(pod) = &nri_pod {
        nri.update_pod_sandbox(
            pod,
            req.overhead
                .as_ref()
                .map(crate::nri::convert::from_cri_resources),
            req.resources
                .as_ref()
                .map(crate::nri::convert::from_cri_resources),
        )
        .await
        .map_err(crate::sandbox::SandboxError::from)?;
    }
    let systemd = config.cgroup_driver == crate::config::CgroupDriver::Systemd;
    tokio::task::spawn_blocking(move || {
        crate::sandbox::resources::update(
            &rec,
            systemd,
            req.overhead.as_ref(),
            req.resources.as_ref(),
        )
    })
    .await
    .map_err(|e| Status::internal(format!("updating pod resources: {e}")))??;
    if let Some(pod) = &nri_pod {
        nri.post_update_pod_sandbox(pod).await;
    }
    Ok(cri::UpdatePodSandboxResourcesResponse {})
}

pub fn list(
    sandboxes: &SandboxManager,
    req: cri::ListPodSandboxRequest,
) -> cri::ListPodSandboxResponse {
    let filter = req.filter.unwrap_or_default();
    let items = sandboxes.list_map(|r| {
        let wanted = (filter.id.is_empty() || r.id.starts_with(&filter.id))
            && filter
                .state
                .as_ref()
                .is_none_or(|s| s.state == state_of(r) as i32)
            && super::labels_match(&filter.label_selector, &r.config.labels);
        wanted.then(|| to_pod_sandbox(r))
    });
    cri::ListPodSandboxResponse { items }
}
