//! `runtime.v1.RuntimeService`: `Version`, `Status` and `RuntimeConfig` are answered here; every
//! RPC that berth does not build yet answers `Unimplemented` (never a fake success).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::error::unimplemented;
use super::trace::{deadline, rpc};
use crate::config::{CgroupDriver, Config};

/// The CRI API version berth speaks.
pub const CRI_API_VERSION: &str = "v1";
/// The name berth reports as its runtime.
pub const RUNTIME_NAME: &str = "berth";

pub struct RuntimeServiceImpl {
    config: Config,
}

impl RuntimeServiceImpl {
    pub fn new(config: Config) -> RuntimeServiceImpl {
        RuntimeServiceImpl { config }
    }

    fn conditions(&self) -> Vec<cri::RuntimeCondition> {
        vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".to_string(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".to_string(),
                status: false,
                reason: "NetworkPluginNotReady".to_string(),
                message: "berth: pod networking is not available yet".to_string(),
            },
        ]
    }
}

/// Defines RPCs that answer `Unimplemented`, each still traced. (`async_trait` cannot see into
/// a macro, so this spells out the signature it would generate.)
macro_rules! not_yet {
    ($($method:ident ( $req:ty ) -> $resp:ty = $name:literal;)*) => {$(
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            _request: Request<$req>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(rpc($name, "", deadline(&_request), async { Err::<$resp, Status>(unimplemented($name)) }))
        }
    )*};
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
            let mut info = HashMap::new();
            if verbose {
                let config = serde_json::json!({
                    "root": self.config.root,
                    "state": self.config.state,
                    "socket": self.config.socket,
                    "defaultRuntime": self.config.default_runtime,
                    "runtimes": self.config.runtimes.keys().collect::<Vec<_>>(),
                    "registries": self.config.registries.keys().collect::<Vec<_>>(),
                });
                info.insert("config".to_string(), config.to_string());
            }
            Ok(cri::StatusResponse {
                status: Some(cri::RuntimeStatus {
                    conditions: self.conditions(),
                }),
                info,
                runtime_handlers: vec![],
                features: None,
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

    not_yet! {
        run_pod_sandbox(cri::RunPodSandboxRequest) -> cri::RunPodSandboxResponse = "RunPodSandbox";
        stop_pod_sandbox(cri::StopPodSandboxRequest) -> cri::StopPodSandboxResponse = "StopPodSandbox";
        remove_pod_sandbox(cri::RemovePodSandboxRequest) -> cri::RemovePodSandboxResponse = "RemovePodSandbox";
        pod_sandbox_status(cri::PodSandboxStatusRequest) -> cri::PodSandboxStatusResponse = "PodSandboxStatus";
        list_pod_sandbox(cri::ListPodSandboxRequest) -> cri::ListPodSandboxResponse = "ListPodSandbox";
        create_container(cri::CreateContainerRequest) -> cri::CreateContainerResponse = "CreateContainer";
        start_container(cri::StartContainerRequest) -> cri::StartContainerResponse = "StartContainer";
        stop_container(cri::StopContainerRequest) -> cri::StopContainerResponse = "StopContainer";
        remove_container(cri::RemoveContainerRequest) -> cri::RemoveContainerResponse = "RemoveContainer";
        list_containers(cri::ListContainersRequest) -> cri::ListContainersResponse = "ListContainers";
        container_status(cri::ContainerStatusRequest) -> cri::ContainerStatusResponse = "ContainerStatus";
        update_container_resources(cri::UpdateContainerResourcesRequest) -> cri::UpdateContainerResourcesResponse = "UpdateContainerResources";
        reopen_container_log(cri::ReopenContainerLogRequest) -> cri::ReopenContainerLogResponse = "ReopenContainerLog";
        exec_sync(cri::ExecSyncRequest) -> cri::ExecSyncResponse = "ExecSync";
        exec(cri::ExecRequest) -> cri::ExecResponse = "Exec";
        attach(cri::AttachRequest) -> cri::AttachResponse = "Attach";
        port_forward(cri::PortForwardRequest) -> cri::PortForwardResponse = "PortForward";
        container_stats(cri::ContainerStatsRequest) -> cri::ContainerStatsResponse = "ContainerStats";
        list_container_stats(cri::ListContainerStatsRequest) -> cri::ListContainerStatsResponse = "ListContainerStats";
        pod_sandbox_stats(cri::PodSandboxStatsRequest) -> cri::PodSandboxStatsResponse = "PodSandboxStats";
        list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest) -> cri::ListPodSandboxStatsResponse = "ListPodSandboxStats";
        update_runtime_config(cri::UpdateRuntimeConfigRequest) -> cri::UpdateRuntimeConfigResponse = "UpdateRuntimeConfig";
        checkpoint_container(cri::CheckpointContainerRequest) -> cri::CheckpointContainerResponse = "CheckpointContainer";
        list_metric_descriptors(cri::ListMetricDescriptorsRequest) -> cri::ListMetricDescriptorsResponse = "ListMetricDescriptors";
        list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest) -> cri::ListPodSandboxMetricsResponse = "ListPodSandboxMetrics";
    }

    type GetContainerEventsStream = BoxStream<cri::ContainerEventResponse>;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        rpc("GetContainerEvents", "", None, async {
            Err::<Self::GetContainerEventsStream, Status>(unimplemented("GetContainerEvents"))
        })
        .await
    }
}
