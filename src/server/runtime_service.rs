//! `runtime.v1.RuntimeService`: `Version`, `Status` and `RuntimeConfig` are answered here; pod
//! and container RPCs delegate to [`super::pod_sandbox`] and [`super::container`]; every RPC
//! that berth does not build yet answers `Unimplemented` (never a fake success).

use std::collections::HashMap;
use std::sync::Arc;

use crate::cri::v1 as cri;
use crate::cri::v1::runtime_service_server::RuntimeService;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::trace::{deadline, detached, rpc};
use super::{container, events, list_stream, pod_sandbox, stats};
use crate::config::{CgroupDriver, Config};
use crate::container::manager::ContainerManager;
use crate::container::volumes;
use crate::events::EventHub;
use crate::sandbox::SandboxManager;
use crate::stats::Collector;
use crate::stats::fs::FsUsage;
use crate::stream::Streamer;

/// The CRI API version berth speaks.
pub const CRI_API_VERSION: &str = "v1";
/// The name berth reports as its runtime.
pub const RUNTIME_NAME: &str = "berth";

pub struct RuntimeServiceImpl {
    config: Config,
    sandboxes: Arc<SandboxManager>,
    containers: Arc<ContainerManager>,
    stats: Arc<Collector>,
    events: Arc<EventHub>,
    streamer: Arc<Streamer>,
    fs: Arc<FsUsage>,
}

impl RuntimeServiceImpl {
    pub fn new(
        config: Config,
        sandboxes: Arc<SandboxManager>,
        containers: Arc<ContainerManager>,
        events: Arc<EventHub>,
        streamer: Arc<Streamer>,
        fs: Arc<FsUsage>,
    ) -> RuntimeServiceImpl {
        let systemd = config.cgroup_driver == CgroupDriver::Systemd;
        let stats = Arc::new(Collector::new(
            crate::cgroups::detect(),
            systemd,
            config.root.clone(),
            fs.clone(),
        ));
        RuntimeServiceImpl {
            config,
            sandboxes,
            containers,
            stats,
            events,
            streamer,
            fs,
        }
    }

    async fn conditions(&self) -> Vec<cri::RuntimeCondition> {
        let network = self.sandboxes.network_ready().await;
        // What the node's kernel lacks (overlayfs; forwarding in native mode).
        let node = crate::node_check::check(self.config.network.mode);
        let runtime = node.runtime_problem();
        let network = match (network, node.network_problem()) {
            (Err(m), _) => Some(("NetworkPluginNotReady", m)),
            (Ok(()), problem) => problem,
        };
        let condition = |kind: &str, problem: Option<(&str, String)>| {
            let (reason, message) = problem.unwrap_or_default();
            cri::RuntimeCondition {
                r#type: kind.to_string(),
                status: reason.is_empty(),
                reason: reason.to_string(),
                message,
            }
        };
        vec![
            condition("RuntimeReady", runtime),
            condition("NetworkReady", network),
        ]
    }
}

impl RuntimeServiceImpl {
    /// Every configured handler, and the default one again under the name `""` (as containerd
    /// reports them). Recursive read-only mounts are berth's own work (`mount_setattr`), so
    /// every handler has them when the kernel does; user namespaces are not built.
    fn runtime_handlers(&self) -> Vec<cri::RuntimeHandler> {
        let features = cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: volumes::recursive_read_only_supported(),
            user_namespaces: false,
        };
        let mut out = Vec::new();
        for name in self.config.runtimes.keys() {
            out.push(cri::RuntimeHandler {
                name: name.clone(),
                features: Some(features),
            });
            if *name == self.config.default_runtime {
                out.push(cri::RuntimeHandler {
                    name: String::new(),
                    features: Some(features),
                });
            }
        }
        out
    }
}

impl RuntimeServiceImpl {
    /// `Status{verbose}`'s `info`, what `crictl info` shows an operator: each value is JSON.
    async fn verbose_info(&self, conditions: &[cri::RuntimeCondition]) -> HashMap<String, String> {
        let mut handlers = Vec::new();
        for (name, rc) in &self.config.runtimes {
            handlers.push(serde_json::json!({
                "name": name,
                "default": *name == self.config.default_runtime,
                "path": rc.path,
                "resolvedPath": resolve_binary(&rc.path),
                "version": binary_version(&rc.path).await,
                "root": self.config.state.join("runtime").join(name),
            }));
        }
        let features = self.runtime_handlers().first().and_then(|h| h.features);
        let network_ready = conditions
            .iter()
            .find(|c| c.r#type == "NetworkReady")
            .map(|c| (c.status, c.message.clone()))
            .unwrap_or_default();
        let mut network = self.sandboxes.network_info();
        if let Some(obj) = network.as_object_mut() {
            obj.insert("ready".into(), network_ready.0.into());
            obj.insert("message".into(), network_ready.1.into());
        }
        let mut info = status_info(
            &self.config,
            serde_json::Value::Array(handlers),
            features,
            network,
        );
        // NRI as an operator checks it: on or off, where plugins connect, who is connected.
        let nri = &self.config.nri;
        info.insert(
            "nri".to_string(),
            serde_json::json!({
                "enabled": !nri.disable,
                "socketPath": (!nri.disable && !nri.disable_connections).then_some(&nri.socket_path),
                "plugins": self.sandboxes.nri().plugin_names(),
            })
            .to_string(),
        );
        info
    }
}

/// The `info` map of a verbose Status, from its parts (see [`RuntimeServiceImpl::verbose_info`]).
/// The config holds no secrets (credentials come with each PullImage, never from it).
fn status_info(
    config: &Config,
    handlers: serde_json::Value,
    features: Option<cri::RuntimeHandlerFeatures>,
    network: serde_json::Value,
) -> HashMap<String, String> {
    let layout = match crate::cgroups::detect() {
        crate::cgroups::Layout::V1 => "v1",
        crate::cgroups::Layout::V2 => "v2",
    };
    let driver = match config.cgroup_driver {
        CgroupDriver::Cgroupfs => "cgroupfs",
        CgroupDriver::Systemd => "systemd",
    };
    let mut info = HashMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        info.insert(k.to_string(), v.to_string());
    };
    put(
        "config",
        serde_json::to_value(config).unwrap_or(serde_json::Value::Null),
    );
    put(
        "version",
        serde_json::json!({
            "runtimeName": RUNTIME_NAME,
            "runtimeVersion": env!("CARGO_PKG_VERSION"),
            "runtimeApiVersion": CRI_API_VERSION,
            "criApi": "k8s.io/cri-api v0.36.3",
            "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        }),
    );
    put(
        "runtimeHandlers",
        serde_json::json!({
            "defaultRuntime": config.default_runtime,
            "features": features.map(|f| serde_json::json!({
                "recursiveReadOnlyMounts": f.recursive_read_only_mounts,
                "userNamespaces": f.user_namespaces,
            })),
            "handlers": handlers,
        }),
    );
    put("network", network);
    put(
        "cgroup",
        serde_json::json!({ "driver": driver, "version": layout }),
    );
    info
}

/// The path a runtime binary runs from (looked up in `PATH` when it is a bare name).
fn resolve_binary(path: &std::path::Path) -> Option<std::path::PathBuf> {
    if path.components().count() > 1 {
        return path.exists().then(|| path.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|dirs| {
        std::env::split_paths(&dirs)
            .map(|d| d.join(path))
            .find(|p| p.is_file())
    })
}

/// The first line of `<binary> --version` (or why there is none), within 5 s.
async fn binary_version(path: &std::path::Path) -> String {
    let run = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Ok(Ok(out)) => format!("--version failed: {}", out.status),
        Ok(Err(e)) => format!("cannot run: {e}"),
        Err(_) => "--version did not answer in 5s".to_string(),
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        rpc("Version", "", None, async {
            Ok(cri::VersionResponse {
                version: "0.1.0".to_string(),
                runtime_name: RUNTIME_NAME.to_string(),
                runtime_version: env!("CARGO_PKG_VERSION").to_string(),
                runtime_api_version: CRI_API_VERSION.to_string(),
            })
        })
        .await
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let deadline = deadline(&request);
        let verbose = request.into_inner().verbose;
        rpc("Status", "", deadline, async {
            let conditions = self.conditions().await;
            let info = if verbose {
                self.verbose_info(&conditions).await
            } else {
                HashMap::new()
            };
            Ok(cri::StatusResponse {
                status: Some(cri::RuntimeStatus { conditions }),
                info,
                runtime_handlers: self.runtime_handlers(),
                // berth resolves users and groups itself (src/container/user.rs): Merge and
                // Strict are both built.
                features: Some(cri::RuntimeFeatures {
                    supplemental_groups_policy: true,
                    // No user namespaces here (runc 1.1 has no idmapped mounts).
                    user_namespaces_host_network: false,
                }),
            })
        })
        .await
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        rpc("RuntimeConfig", "", None, async {
            let driver = match self.config.cgroup_driver {
                CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
                CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            };
            Ok(cri::RuntimeConfigResponse {
                linux: Some(cri::LinuxRuntimeConfiguration {
                    cgroup_driver: driver as i32,
                }),
            })
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        rpc(
            "RunPodSandbox",
            &name,
            deadline,
            pod_sandbox::run(&self.sandboxes, &self.containers, &self.config, req),
        )
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().pod_sandbox_id;
        let (sandboxes, containers) = (self.sandboxes.clone(), self.containers.clone());
        rpc(
            "StopPodSandbox",
            &id.clone(),
            deadline,
            detached(async move {
                if let Ok(full) = sandboxes.resolve_id(&id) {
                    containers.stop_pod(&full).await?;
                }
                sandboxes.stop(&id).await?;
                Ok(cri::StopPodSandboxResponse {})
            }),
        )
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().pod_sandbox_id;
        let (sandboxes, containers, fs) = (
            self.sandboxes.clone(),
            self.containers.clone(),
            self.fs.clone(),
        );
        rpc(
            "RemovePodSandbox",
            &id.clone(),
            deadline,
            detached(async move {
                if let Ok(full) = sandboxes.resolve_id(&id) {
                    containers.remove_pod(&full).await?;
                    fs.nudge();
                }
                sandboxes.remove(&id).await?;
                // What the pod's records, buffers and tasks held goes back to the kernel.
                crate::alloc::trim_soon();
                Ok(cri::RemovePodSandboxResponse {})
            }),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.pod_sandbox_id.clone();
        rpc("PodSandboxStatus", &id, deadline, async {
            let mut resp = pod_sandbox::status(&self.sandboxes, req).await?;
            // The pod's containers with it, at one instant (the Evented PLEG reads them).
            let pod_id = resp
                .status
                .as_ref()
                .map(|s| s.id.clone())
                .unwrap_or_default();
            resp.containers_statuses = self
                .containers
                .list_pod(&pod_id)
                .iter()
                .map(container::to_status)
                .collect();
            resp.timestamp = crate::ids::now_nanos();
            Ok(resp)
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        rpc("ListPodSandbox", "", deadline, async {
            Ok(pod_sandbox::list(&self.sandboxes, req))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let deadline = deadline(&request);
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        rpc("UpdateRuntimeConfig", &cidr, deadline, async {
            if !cidr.is_empty() {
                self.sandboxes.set_pod_cidr(&cidr).await?;
            }
            Ok(cri::UpdateRuntimeConfigResponse {})
        })
        .await
    }

    type StreamPodSandboxesStream = BoxStream<cri::StreamPodSandboxesResponse>;

    async fn stream_pod_sandboxes(
        &self,
        request: Request<cri::StreamPodSandboxesRequest>,
    ) -> Result<Response<Self::StreamPodSandboxesStream>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("StreamPodSandboxes", "", deadline, async {
            let items =
                pod_sandbox::list(&self.sandboxes, cri::ListPodSandboxRequest { filter }).items;
            Ok(list_stream::stream(items, |pod_sandboxes| {
                cri::StreamPodSandboxesResponse { pod_sandboxes }
            }))
        })
        .await
    }

    async fn update_pod_sandbox_resources(
        &self,
        request: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.pod_sandbox_id.clone();
        rpc(
            "UpdatePodSandboxResources",
            &id,
            deadline,
            pod_sandbox::update_resources(&self.sandboxes, &self.config, req),
        )
        .await
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| format!("{}/{}", req.pod_sandbox_id, m.name))
            .unwrap_or_default();
        let created = rpc(
            "CreateContainer",
            &name,
            deadline,
            container::create(&self.containers, req),
        )
        .await;
        if created.is_ok() {
            self.fs.nudge();
        }
        created
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        let containers = self.containers.clone();
        rpc(
            "StartContainer",
            &id.clone(),
            deadline,
            detached(async move {
                containers.start(&id).await?;
                Ok(cri::StartContainerResponse {})
            }),
        )
        .await
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        let containers = self.containers.clone();
        rpc(
            "StopContainer",
            &id,
            deadline,
            detached(async move {
                containers.stop(&req.container_id, req.timeout).await?;
                Ok(cri::StopContainerResponse {})
            }),
        )
        .await
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        let (containers, fs) = (self.containers.clone(), self.fs.clone());
        rpc(
            "RemoveContainer",
            &id.clone(),
            deadline,
            detached(async move {
                containers.remove(&id).await?;
                fs.nudge();
                Ok(cri::RemoveContainerResponse {})
            }),
        )
        .await
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        rpc("ListContainers", "", deadline, async {
            Ok(container::list(&self.containers, req))
        })
        .await
    }

    type StreamContainersStream = BoxStream<cri::StreamContainersResponse>;

    async fn stream_containers(
        &self,
        request: Request<cri::StreamContainersRequest>,
    ) -> Result<Response<Self::StreamContainersStream>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("StreamContainers", "", deadline, async {
            let items =
                container::list(&self.containers, cri::ListContainersRequest { filter }).containers;
            Ok(list_stream::stream(items, |containers| {
                cri::StreamContainersResponse { containers }
            }))
        })
        .await
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        rpc("ContainerStatus", &id, deadline, async {
            container::status(&self.containers, req)
        })
        .await
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        let containers = self.containers.clone();
        rpc(
            "UpdateContainerResources",
            &id,
            deadline,
            detached(async move {
                let linux = req.linux.unwrap_or_default();
                containers
                    .update_resources(&req.container_id, linux)
                    .await?;
                Ok(cri::UpdateContainerResourcesResponse {})
            }),
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        rpc("ReopenContainerLog", &id, deadline, async {
            self.containers.reopen_log(&id).await?;
            Ok(cri::ReopenContainerLogResponse {})
        })
        .await
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        rpc(
            "ExecSync",
            &id,
            deadline,
            container::exec_sync(&self.containers, req),
        )
        .await
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        rpc("Exec", &id, deadline, async {
            let url = self.streamer.exec_url(req)?;
            Ok(cri::ExecResponse { url })
        })
        .await
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        rpc("Attach", &id, deadline, async {
            let url = self.streamer.attach_url(req)?;
            Ok(cri::AttachResponse { url })
        })
        .await
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.pod_sandbox_id.clone();
        rpc("PortForward", &id, deadline, async {
            let url = self.streamer.port_forward_url(req)?;
            Ok(cri::PortForwardResponse { url })
        })
        .await
    }

    async fn checkpoint_container(
        &self,
        request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        rpc("CheckpointContainer", &id, deadline, async {
            Err::<cri::CheckpointContainerResponse, Status>(Status::unimplemented(
                "berth does not checkpoint containers: it needs CRIU and an OCI runtime \
                 `checkpoint`, which berth does not drive (containerd and CRI-O need CRIU too)",
            ))
        })
        .await
    }

    type StreamContainerStatsStream = BoxStream<cri::StreamContainerStatsResponse>;
    type StreamPodSandboxStatsStream = BoxStream<cri::StreamPodSandboxStatsResponse>;
    type StreamPodSandboxMetricsStream = BoxStream<cri::StreamPodSandboxMetricsResponse>;

    // The streaming forms of the stats and metrics RPCs answer as their unary forms do.
    async fn stream_container_stats(
        &self,
        request: Request<cri::StreamContainerStatsRequest>,
    ) -> Result<Response<Self::StreamContainerStatsStream>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("StreamContainerStats", "", deadline, async {
            let items = stats::list_container_stats(&self.stats, &self.containers, filter).await?;
            Ok(list_stream::stream(items, |container_stats| {
                cri::StreamContainerStatsResponse { container_stats }
            }))
        })
        .await
    }

    async fn stream_pod_sandbox_stats(
        &self,
        request: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("StreamPodSandboxStats", "", deadline, async {
            let items = stats::list_pod_sandbox_stats(
                &self.stats,
                &self.sandboxes,
                &self.containers,
                filter,
            )
            .await?;
            Ok(list_stream::stream(items, |pod_sandbox_stats| {
                cri::StreamPodSandboxStatsResponse { pod_sandbox_stats }
            }))
        })
        .await
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.container_id.clone();
        rpc(
            "ContainerStats",
            &id,
            deadline,
            stats::container_stats(&self.stats, &self.containers, req),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("ListContainerStats", "", deadline, async {
            let stats = stats::list_container_stats(&self.stats, &self.containers, filter).await?;
            Ok(cri::ListContainerStatsResponse { stats })
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let id = req.pod_sandbox_id.clone();
        rpc(
            "PodSandboxStats",
            &id,
            deadline,
            stats::pod_sandbox_stats(&self.stats, &self.sandboxes, &self.containers, req),
        )
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let deadline = deadline(&request);
        let filter = request.into_inner().filter;
        rpc("ListPodSandboxStats", "", deadline, async {
            let stats = stats::list_pod_sandbox_stats(
                &self.stats,
                &self.sandboxes,
                &self.containers,
                filter,
            )
            .await?;
            Ok(cri::ListPodSandboxStatsResponse { stats })
        })
        .await
    }

    async fn stream_pod_sandbox_metrics(
        &self,
        request: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
        let deadline = deadline(&request);
        rpc("StreamPodSandboxMetrics", "", deadline, async {
            let items =
                stats::list_pod_sandbox_metrics(&self.stats, &self.sandboxes, &self.containers)
                    .await?;
            Ok(list_stream::stream(items, |pod_sandbox_metrics| {
                cri::StreamPodSandboxMetricsResponse {
                    pod_sandbox_metrics,
                }
            }))
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        let deadline = deadline(&request);
        rpc("ListMetricDescriptors", "", deadline, async {
            Ok(stats::list_metric_descriptors())
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let deadline = deadline(&request);
        rpc("ListPodSandboxMetrics", "", deadline, async {
            let pod_metrics =
                stats::list_pod_sandbox_metrics(&self.stats, &self.sandboxes, &self.containers)
                    .await?;
            Ok(cri::ListPodSandboxMetricsResponse { pod_metrics })
        })
        .await
    }

    type GetContainerEventsStream = BoxStream<cri::ContainerEventResponse>;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        // No deadline: the stream lasts as long as the subscriber reads it.
        rpc("GetContainerEvents", "", None, async {
            Ok(events::subscribe(&self.events))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_info_is_json_an_operator_can_read() {
        let config = Config::default();
        let info = status_info(
            &config,
            serde_json::json!([{"name": "runc"}]),
            Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: true,
                user_namespaces: false,
            }),
            serde_json::json!({"mode": "native"}),
        );
        let get = |k: &str| -> serde_json::Value {
            serde_json::from_str(info.get(k).unwrap_or_else(|| panic!("no {k}")))
                .unwrap_or_else(|e| panic!("{k} is not JSON: {e}"))
        };
        let c = get("config");
        assert_eq!(c["root"], "/var/lib/berth");
        assert_eq!(c["default_runtime"], "runc");
        assert_eq!(c["stats"]["fs_refresh_interval"], "10s");
        assert_eq!(get("version")["runtimeName"], "berth");
        let h = get("runtimeHandlers");
        assert_eq!(h["defaultRuntime"], "runc");
        assert_eq!(h["features"]["recursiveReadOnlyMounts"], true);
        assert_eq!(h["handlers"][0]["name"], "runc");
        assert_eq!(get("network")["mode"], "native");
        assert_eq!(get("cgroup")["driver"], "cgroupfs");
    }

    #[test]
    fn runtime_binaries_resolve_in_path() {
        assert_eq!(
            resolve_binary(std::path::Path::new("/nonexistent/runc")),
            None
        );
        assert!(resolve_binary(std::path::Path::new("sh")).is_some());
    }
}
