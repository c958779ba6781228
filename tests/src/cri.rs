//! A CRI (Kubernetes Container Runtime Interface, `runtime.v1`) client for the tests, and a whole
//! pod lifecycle as kubelet would drive it, over containerd's gRPC Unix socket.
//!
//! The messages are written out by hand ([`proto`]): only the calls and fields a pod's life needs,
//! with the field numbers of `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`. Proto3 ignores unknown
//! fields, so a subset talks to any CRI runtime; and the build needs no `protoc` (the `k8s-cri`
//! crate generates its bindings with it at build time).
//!
//! [`run_pod_lifecycle`] takes the socket path as a parameter, so the same function drives a
//! scratch containerd on this machine (tests/tests/cri_local.rs) and the DPU's containerd in the
//! separated-DPU harness. Every call has a timeout; a failure names the step. The caller gets a
//! [`Running`] snapshot while the container runs (to check the HOST's process table, cgroups…)
//! and a [`PodReport`] of everything the runtime said.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI v1 messages used here (a subset of each message's fields, same tags as upstream).
#[allow(missing_docs)]
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum NamespaceMode {
        Pod = 0,
        Container = 1,
        Node = 2,
        Target = 3,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespaceOption {
        #[prost(enumeration = "NamespaceMode", tag = "1")]
        pub network: i32,
        #[prost(enumeration = "NamespaceMode", tag = "2")]
        pub pid: i32,
        #[prost(enumeration = "NamespaceMode", tag = "3")]
        pub ipc: i32,
        #[prost(string, tag = "4")]
        pub target_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxSandboxSecurityContext {
        #[prost(message, optional, tag = "1")]
        pub namespace_options: Option<NamespaceOption>,
        #[prost(bool, tag = "6")]
        pub privileged: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxSandboxSecurityContext>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "7")]
        pub annotations: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum PodSandboxState {
        SandboxReady = 0,
        SandboxNotready = 1,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxNetworkStatus {
        #[prost(string, tag = "1")]
        pub ip: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(message, optional, tag = "5")]
        pub network: Option<PodSandboxNetworkStatus>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandbox {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxResponse {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<PodSandbox>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "2")]
        pub image: Option<ImageSpec>,
        #[prost(string, repeated, tag = "3")]
        pub command: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub args: Vec<String>,
        #[prost(string, tag = "5")]
        pub working_dir: String,
        #[prost(message, repeated, tag = "6")]
        pub envs: Vec<KeyValue>,
        #[prost(message, repeated, tag = "7")]
        pub mounts: Vec<Mount>,
        #[prost(map = "string, string", tag = "9")]
        pub labels: HashMap<String, String>,
        #[prost(string, tag = "11")]
        pub log_path: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mount {
        #[prost(string, tag = "1")]
        pub container_path: String,
        #[prost(string, tag = "2")]
        pub host_path: String,
        #[prost(bool, tag = "3")]
        pub readonly: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub config: Option<ContainerConfig>,
        #[prost(message, optional, tag = "3")]
        pub sandbox_config: Option<PodSandboxConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerResponse {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerIdRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StopContainerRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(int64, tag = "2")]
        pub timeout: i64,
    }
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ContainerState {
        ContainerCreated = 0,
        ContainerRunning = 1,
        ContainerExited = 2,
        ContainerUnknown = 3,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(enumeration = "ContainerState", tag = "6")]
        pub state: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatusRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(enumeration = "ContainerState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(int64, tag = "5")]
        pub started_at: i64,
        #[prost(int64, tag = "6")]
        pub finished_at: i64,
        #[prost(int32, tag = "7")]
        pub exit_code: i32,
        #[prost(message, optional, tag = "8")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "9")]
        pub image_ref: String,
        #[prost(string, tag = "10")]
        pub reason: String,
        #[prost(string, tag = "11")]
        pub message: String,
        #[prost(string, tag = "15")]
        pub log_path: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<ContainerStatus>,
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, repeated, tag = "2")]
        pub cmd: Vec<String>,
        #[prost(int64, tag = "3")]
        pub timeout: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncResponse {
        #[prost(bytes = "vec", tag = "1")]
        pub stdout: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub stderr: Vec<u8>,
        #[prost(int32, tag = "3")]
        pub exit_code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UInt64Value {
        #[prost(uint64, tag = "1")]
        pub value: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuUsage {
        #[prost(int64, tag = "1")]
        pub timestamp: i64,
        #[prost(message, optional, tag = "2")]
        pub usage_core_nano_seconds: Option<UInt64Value>,
        #[prost(message, optional, tag = "3")]
        pub usage_nano_cores: Option<UInt64Value>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryUsage {
        #[prost(int64, tag = "1")]
        pub timestamp: i64,
        #[prost(message, optional, tag = "2")]
        pub working_set_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "3")]
        pub available_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "4")]
        pub usage_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "5")]
        pub rss_bytes: Option<UInt64Value>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerAttributes {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStats {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<ContainerAttributes>,
        #[prost(message, optional, tag = "2")]
        pub cpu: Option<CpuUsage>,
        #[prost(message, optional, tag = "3")]
        pub memory: Option<MemoryUsage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatsResponse {
        #[prost(message, optional, tag = "1")]
        pub stats: Option<ContainerStats>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
        #[prost(string, repeated, tag = "3")]
        pub repo_digests: Vec<String>,
        #[prost(uint64, tag = "4")]
        pub size: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }
}

/// Why a CRI call or the lifecycle failed; names the step.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// Could not connect to the socket.
    #[error("connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The runtime answered a call with an error status.
    #[error("{call}: {status}")]
    Status {
        /// The CRI method.
        call: &'static str,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// A call did not answer in time.
    #[error("{call}: no answer within {timeout:?}")]
    Timeout {
        /// The CRI method.
        call: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The runtime answered, but not what a working runtime answers.
    #[error("{step}: {detail}")]
    Unexpected {
        /// The lifecycle step.
        step: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The caller's check in the running state failed.
    #[error("check while running: {0}")]
    Check(String),
}

/// A CRI client over one Unix socket; every call is bounded by `timeout`.
#[derive(Clone)]
pub struct CriClient {
    grpc: tonic::client::Grpc<Channel>,
    /// Limit for each call (ExecSync adds its own command timeout to it).
    pub timeout: Duration,
}

impl CriClient {
    /// Connects to `socket` (e.g. containerd's `/run/containerd/containerd.sock`).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        let p2 = path.clone();
        // The URI is required by the API and ignored by the connector.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p2.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| CriError::Connect { path, source })?;
        Ok(CriClient {
            grpc: tonic::client::Grpc::new(channel),
            timeout,
        })
    }

    async fn call<Req, Resp>(
        &self,
        service: &'static str,
        method: &'static str,
        req: Req,
        extra: Duration,
    ) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let limit = self.timeout + extra;
        let mut grpc = self.grpc.clone();
        let path: http::uri::PathAndQuery = format!("/runtime.v1.{service}/{method}")
            .parse()
            .map_err(|e| CriError::Unexpected {
                step: method,
                detail: format!("bad path: {e}"),
            })?;
        let fut = async move {
            grpc.ready().await.map_err(|e| CriError::Status {
                call: method,
                status: Box::new(tonic::Status::unavailable(e.to_string())),
            })?;
            let mut r = tonic::Request::new(req);
            r.set_timeout(limit);
            grpc.unary(r, path, tonic_prost::ProstCodec::<Req, Resp>::default())
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| CriError::Status {
                    call: method,
                    status: Box::new(s),
                })
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| CriError::Timeout {
                call: method,
                timeout: limit,
            })?
    }

    async fn rt<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call("RuntimeService", method, req, Duration::ZERO)
            .await
    }

    /// `Version`.
    pub async fn version(&self) -> Result<proto::VersionResponse, CriError> {
        self.rt(
            "Version",
            proto::VersionRequest {
                version: "v1".into(),
            },
        )
        .await
    }

    /// `ImageService/ImageStatus`: `None` if the runtime does not have the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<proto::Image>, CriError> {
        let r: proto::ImageStatusResponse = self
            .call(
                "ImageService",
                "ImageStatus",
                proto::ImageStatusRequest {
                    image: Some(proto::ImageSpec {
                        image: image.into(),
                    }),
                    verbose: false,
                },
                Duration::ZERO,
            )
            .await?;
        Ok(r.image)
    }

    /// `RunPodSandbox`: returns the sandbox id.
    pub async fn run_pod_sandbox(
        &self,
        config: proto::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let r: proto::RunPodSandboxResponse = self
            .rt(
                "RunPodSandbox",
                proto::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                },
            )
            .await?;
        Ok(r.pod_sandbox_id)
    }

    /// `PodSandboxStatus` (verbose: `info["info"]` holds JSON with the sandbox's `pid`).
    pub async fn pod_sandbox_status(
        &self,
        id: &str,
    ) -> Result<proto::PodSandboxStatusResponse, CriError> {
        self.rt(
            "PodSandboxStatus",
            proto::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            },
        )
        .await
    }

    /// `StopPodSandbox`.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: proto::Empty = self
            .rt(
                "StopPodSandbox",
                proto::PodSandboxIdRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    /// `RemovePodSandbox`.
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: proto::Empty = self
            .rt(
                "RemovePodSandbox",
                proto::PodSandboxIdRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    /// `ListPodSandbox` (no filter).
    pub async fn list_pod_sandbox(&self) -> Result<Vec<proto::PodSandbox>, CriError> {
        let r: proto::ListPodSandboxResponse = self
            .rt("ListPodSandbox", proto::ListPodSandboxRequest {})
            .await?;
        Ok(r.items)
    }

    /// `CreateContainer`: returns the container id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: proto::ContainerConfig,
        sandbox_config: proto::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let r: proto::CreateContainerResponse = self
            .rt(
                "CreateContainer",
                proto::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.into(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                },
            )
            .await?;
        Ok(r.container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let _: proto::Empty = self
            .rt(
                "StartContainer",
                proto::ContainerIdRequest {
                    container_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    /// `StopContainer` with a grace period of `grace_secs` (the call may take that long).
    pub async fn stop_container(&self, id: &str, grace_secs: i64) -> Result<(), CriError> {
        let _: proto::Empty = self
            .call(
                "RuntimeService",
                "StopContainer",
                proto::StopContainerRequest {
                    container_id: id.into(),
                    timeout: grace_secs,
                },
                Duration::from_secs(grace_secs.max(0) as u64),
            )
            .await?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let _: proto::Empty = self
            .rt(
                "RemoveContainer",
                proto::ContainerIdRequest {
                    container_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    /// `ListContainers` (no filter).
    pub async fn list_containers(&self) -> Result<Vec<proto::Container>, CriError> {
        let r: proto::ListContainersResponse = self
            .rt("ListContainers", proto::ListContainersRequest {})
            .await?;
        Ok(r.containers)
    }

    /// `ContainerStatus` (verbose: `info["info"]` holds JSON with the task's `pid`).
    pub async fn container_status(
        &self,
        id: &str,
    ) -> Result<proto::ContainerStatusResponse, CriError> {
        self.rt(
            "ContainerStatus",
            proto::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            },
        )
        .await
    }

    /// `ExecSync` of `cmd` with a command timeout of `timeout_secs`.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecResult, CriError> {
        let r: proto::ExecSyncResponse = self
            .call(
                "RuntimeService",
                "ExecSync",
                proto::ExecSyncRequest {
                    container_id: id.into(),
                    cmd: cmd.iter().map(|s| s.to_string()).collect(),
                    timeout: timeout_secs,
                },
                Duration::from_secs(timeout_secs.max(0) as u64),
            )
            .await?;
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// `ContainerStats`.
    pub async fn container_stats(&self, id: &str) -> Result<proto::ContainerStats, CriError> {
        let r: proto::ContainerStatsResponse = self
            .rt(
                "ContainerStats",
                proto::ContainerIdRequest {
                    container_id: id.into(),
                },
            )
            .await?;
        r.stats.ok_or(CriError::Unexpected {
            step: "ContainerStats",
            detail: "no stats in the answer".into(),
        })
    }

    /// Stops and removes every pod sandbox (and so its containers): for cleanup after a failed
    /// test, and to leave a runtime as found. Returns how many sandboxes were removed.
    pub async fn remove_all_pods(&self) -> Result<usize, CriError> {
        let pods = self.list_pod_sandbox().await?;
        for c in self.list_containers().await? {
            let _ = self.stop_container(&c.id, 0).await;
            let _ = self.remove_container(&c.id).await;
        }
        for p in &pods {
            self.stop_pod_sandbox(&p.id).await?;
            self.remove_pod_sandbox(&p.id).await?;
        }
        Ok(pods.len())
    }
}

/// The `[plugins."io.containerd.grpc.v1.cri"]` section of a containerd 1.6 `version = 2` config
/// for host-network pods, as the tests use it (append it to a config that has no such section):
/// - `sandbox_image`: the pause image imported into namespace `k8s.io` (no registry to pull from);
/// - cgroupfs driver (`SystemdCgroup = false`): no systemd here, cgroup v1 hybrid;
/// - `restrict_oom_score_adj = true`: CRI gives the pause `oom_score_adj = -998`, which needs
///   `CAP_SYS_RESOURCE`; without it (as in this machine's sandbox) runc init dies with
///   "failed to update /proc/self/oom_score_adj: Permission denied" and RunPodSandbox fails with
///   "can't get final child's PID from pipe: EOF". Restricted, the value is clamped to containerd's;
/// - `disable_apparmor = true`: no AppArmor profile to load;
/// - `runtime_type`: `io.containerd.runc.v2` for the stock shim, or an absolute path to a shim
///   binary such as `offload-shim` (containerd 1.6 runs a path as given). Runtime `options` are
///   written only for `io.containerd.runc.v2`: for any other type CRI encodes them as
///   `runtimeoptions.v1.Options`, which the real runc shim behind `offload-shim` cannot decode
///   ("start failed: io.containerd.runc.v2: type with url runtimeoptions.v1.Options: not found").
///   Installing `offload-shim` under the stock name (`containerd-shim-runc-v2`) keeps the runc
///   options; cgroupfs is runc's default either way;
/// - CNI directories that may stay empty: with `network = NODE` containerd 1.6 never calls CNI
///   (it only logs "failed to load cni during init" at start).
pub fn containerd_cri_config(
    sandbox_image: &str,
    runtime_type: &str,
    cni_bin_dir: &Path,
    cni_conf_dir: &Path,
) -> String {
    let options = if runtime_type == "io.containerd.runc.v2" {
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n    \
         SystemdCgroup = false\n  "
    } else {
        ""
    };
    format!(
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox_image}\"\n  \
         disable_cgroup = false\n  systemd_cgroup = false\n  disable_apparmor = true\n  \
         restrict_oom_score_adj = true\n  \
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"overlayfs\"\n    \
         default_runtime_name = \"runc\"\n  \
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n    \
         runtime_type = \"{runtime_type}\"\n  \
         {options}\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = \"{}\"\n    conf_dir = \"{}\"\n",
        cni_bin_dir.display(),
        cni_conf_dir.display(),
    )
}

/// What an `ExecSync` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code of the command.
    pub exit_code: i32,
}

/// What [`run_pod_lifecycle`] does.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// The runtime's CRI socket (containerd's gRPC socket).
    pub socket: PathBuf,
    /// Image of the workload container; must already be in the runtime (containerd namespace
    /// `k8s.io`), as must the runtime's sandbox image.
    pub image: String,
    /// Pod name; also used in the uid and container name.
    pub pod_name: String,
    /// Kubernetes namespace in the pod metadata.
    pub pod_namespace: String,
    /// Cgroup parent of the pod ("" = the runtime's default).
    pub cgroup_parent: String,
    /// Where the runtime writes container logs (`log_directory`); `None` = no logs.
    pub log_directory: Option<PathBuf>,
    /// Command of the workload container; it must keep running until stopped.
    pub command: Vec<String>,
    /// Limit for each CRI call.
    pub call_timeout: Duration,
    /// Grace period given to `StopContainer`.
    pub stop_grace_secs: i64,
    /// Host-path volumes: `(host path, path in the container)`, read-write.
    pub volumes: Vec<(PathBuf, PathBuf)>,
}

impl PodSpec {
    /// A host-network pod whose container (from [`crate::images::MULTI_REF`]) prints `started`
    /// and then execs `sleep 300`.
    pub fn new(socket: impl Into<PathBuf>, pod_name: &str) -> Self {
        PodSpec {
            socket: socket.into(),
            image: crate::images::MULTI_REF.into(),
            pod_name: pod_name.into(),
            pod_namespace: "oecri".into(),
            cgroup_parent: String::new(),
            log_directory: None,
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo started; exec sleep 300".into(),
            ],
            call_timeout: Duration::from_secs(30),
            stop_grace_secs: 2,
            volumes: Vec::new(),
        }
    }
}

/// The pod while its container runs, for the caller's checks on the HOST.
#[derive(Debug, Clone)]
pub struct Running {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Sandbox (pause) process pid, as the runtime reports it.
    pub sandbox_pid: u32,
    /// Container id.
    pub container_id: String,
    /// Container init pid, as the runtime reports it (a pid in the runtime's PID namespace:
    /// with the runtime on the DPU and the containers on the HOST, a HOST pid).
    pub container_pid: u32,
    /// `readlink /proc/self/ns/pid` inside the container (via ExecSync), e.g. `pid:[4026532…]`:
    /// equal to the link of `/proc/<container_pid>/ns/pid` where the container really runs.
    pub pid_ns_inside: String,
    /// `readlink /proc/self/ns/net` inside the container: with `network = NODE` the network
    /// namespace of the node where the container runs (the HOST's).
    pub net_ns_inside: String,
    /// `/proc/self/cgroup` inside the container (via ExecSync).
    pub cgroup_inside: String,
}

/// Everything the runtime answered during [`run_pod_lifecycle`].
#[derive(Debug, Clone)]
pub struct PodReport {
    /// `Version`: runtime name, runtime version, CRI API version.
    pub runtime: (String, String, String),
    /// The snapshot given to the check.
    pub running: Running,
    /// State of the sandbox after RunPodSandbox (READY expected).
    pub sandbox_ready: bool,
    /// ContainerStatus while running.
    pub status_running: proto::ContainerStatus,
    /// `ExecSync echo hi`.
    pub exec_echo: ExecResult,
    /// `ExecSync sh -c 'echo err >&2; exit 7'`.
    pub exec_fail: ExecResult,
    /// ContainerStats while running.
    pub stats: proto::ContainerStats,
    /// ContainerStatus after StopContainer.
    pub status_stopped: proto::ContainerStatus,
    /// Sandbox state after StopPodSandbox (NOTREADY expected).
    pub sandbox_ready_after_stop: bool,
    /// Containers and sandboxes still listed after RemovePodSandbox (all of them; empty if the
    /// runtime runs nothing else).
    pub left_containers: Vec<String>,
    /// See `left_containers`.
    pub left_sandboxes: Vec<String>,
    /// How long each step took.
    pub timings: Vec<(&'static str, Duration)>,
}

impl PodReport {
    /// What differs from a working runtime's answers (empty = all as expected): sandbox READY
    /// then NOTREADY, container RUNNING then EXITED, `echo hi` → "hi" and 0, the failing command
    /// → "err" on stderr and 7, non-zero CPU and memory counters for this container, and nothing
    /// listed after RemovePodSandbox. Process and host checks are the caller's (see
    /// [`check_on_this_host`], [`PodReport::wait_processes_gone`]).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.sandbox_ready {
            p.push("sandbox not READY after RunPodSandbox".to_string());
        }
        if self.sandbox_ready_after_stop {
            p.push("sandbox still READY after StopPodSandbox".into());
        }
        if self.status_running.state != proto::ContainerState::ContainerRunning as i32 {
            p.push(format!(
                "container not RUNNING after StartContainer: {:?}",
                self.status_running
            ));
        }
        if self.status_running.started_at <= 0 {
            p.push("no started_at while running".into());
        }
        if self.status_stopped.state != proto::ContainerState::ContainerExited as i32 {
            p.push(format!(
                "container not EXITED after StopContainer: {:?}",
                self.status_stopped
            ));
        }
        let echo = &self.exec_echo;
        if echo.stdout != "hi\n" || !echo.stderr.is_empty() || echo.exit_code != 0 {
            p.push(format!("ExecSync `echo hi`: {echo:?}"));
        }
        let fail = &self.exec_fail;
        if fail.stderr != "err\n" || fail.exit_code != 7 {
            p.push(format!("ExecSync of a failing command: {fail:?}"));
        }
        if !self.running.pid_ns_inside.starts_with("pid:[") {
            p.push(format!(
                "readlink /proc/self/ns/pid inside: {:?}",
                self.running.pid_ns_inside
            ));
        }
        if !self
            .running
            .cgroup_inside
            .contains(&self.running.container_id)
        {
            p.push(format!(
                "the container's cgroups do not name it: {}",
                self.running.cgroup_inside
            ));
        }
        let s = &self.stats;
        if s.attributes.as_ref().map(|a| a.id.as_str()) != Some(self.running.container_id.as_str())
        {
            p.push(format!("stats of another container: {:?}", s.attributes));
        }
        let cpu = s
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value);
        let mem = s.memory.as_ref().map_or(0, |m| {
            let ws = m.working_set_bytes.as_ref().map_or(0, |v| v.value);
            let us = m.usage_bytes.as_ref().map_or(0, |v| v.value);
            ws.max(us)
        });
        if cpu == 0 || mem == 0 {
            p.push(format!(
                "ContainerStats without usage: cpu {:?}, memory {:?}",
                s.cpu, s.memory
            ));
        }
        if !self.left_containers.is_empty() || !self.left_sandboxes.is_empty() {
            p.push(format!(
                "still listed after RemovePodSandbox: containers {:?}, sandboxes {:?}",
                self.left_containers, self.left_sandboxes
            ));
        }
        p
    }

    /// Waits up to `limit` until the pod's processes (sandbox and container pids) are gone from
    /// this machine's `/proc`: after RemovePodSandbox nothing of the pod may keep running.
    pub fn wait_processes_gone(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        for pid in [self.running.container_pid, self.running.sandbox_pid] {
            while Path::new(&format!("/proc/{pid}")).exists() {
                if start.elapsed() > limit {
                    return Err(format!("pid {pid} of the pod still runs after {limit:?}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

fn info_pid(info: &HashMap<String, String>, step: &'static str) -> Result<u32, CriError> {
    let raw = info.get("info").ok_or_else(|| CriError::Unexpected {
        step,
        detail: format!(
            "no verbose info (keys {:?})",
            info.keys().collect::<Vec<_>>()
        ),
    })?;
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| CriError::Unexpected {
        step,
        detail: format!("verbose info is not JSON: {e}"),
    })?;
    v.get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| CriError::Unexpected {
            step,
            detail: format!("no pid in verbose info: {raw:.300}"),
        })
}

/// Runs one pod through its whole life, as kubelet would: Version, ImageStatus,
/// RunPodSandbox (host network, `NamespaceOption.network = NODE`), PodSandboxStatus,
/// CreateContainer, StartContainer, ContainerStatus, ExecSync (`echo hi`; a failing command),
/// ContainerStats, then `check(&Running)` (the caller's look at the HOST), StopContainer,
/// ContainerStatus, RemoveContainer, StopPodSandbox, PodSandboxStatus, RemovePodSandbox,
/// ListContainers/ListPodSandbox.
///
/// Only the answers that make the next step impossible are errors; the rest goes into the report
/// for the caller to assert on. On an error after RunPodSandbox, the pod is stopped and removed
/// (best effort) before returning.
pub async fn run_pod_lifecycle<F>(spec: &PodSpec, check: F) -> Result<PodReport, CriError>
where
    F: FnOnce(&Running) -> Result<(), String>,
{
    let c = CriClient::connect(&spec.socket, spec.call_timeout).await?;
    let mut timings = Laps {
        t: Instant::now(),
        v: Vec::new(),
    };

    let v = c.version().await?;
    timings.lap("Version");
    if c.image_status(&spec.image).await?.is_none() {
        return Err(CriError::Unexpected {
            step: "ImageStatus",
            detail: format!(
                "{} is not in the runtime (import it into namespace k8s.io)",
                spec.image
            ),
        });
    }
    timings.lap("ImageStatus");

    let uid = format!("{}-{}", spec.pod_name, std::process::id());
    let sandbox_config = proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: spec.pod_name.clone(),
            uid,
            namespace: spec.pod_namespace.clone(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: spec
            .log_directory
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        labels: HashMap::from([("oecri.test".into(), spec.pod_name.clone())]),
        annotations: HashMap::new(),
        linux: Some(proto::LinuxPodSandboxConfig {
            cgroup_parent: spec.cgroup_parent.clone(),
            security_context: Some(proto::LinuxSandboxSecurityContext {
                namespace_options: Some(proto::NamespaceOption {
                    network: proto::NamespaceMode::Node as i32,
                    pid: proto::NamespaceMode::Pod as i32,
                    ipc: proto::NamespaceMode::Pod as i32,
                    target_id: String::new(),
                }),
                privileged: false,
            }),
        }),
    };
    let sandbox_id = c.run_pod_sandbox(sandbox_config.clone()).await?;
    timings.lap("RunPodSandbox");

    let result = async {
        let ps = c.pod_sandbox_status(&sandbox_id).await?;
        timings.lap("PodSandboxStatus");
        let sandbox_ready = ps.status.as_ref().map(|s| s.state)
            == Some(proto::PodSandboxState::SandboxReady as i32);
        let sandbox_pid = info_pid(&ps.info, "PodSandboxStatus")?;

        let container_config = proto::ContainerConfig {
            metadata: Some(proto::ContainerMetadata {
                name: format!("{}-main", spec.pod_name),
                attempt: 0,
            }),
            image: Some(proto::ImageSpec {
                image: spec.image.clone(),
            }),
            command: spec.command.clone(),
            args: Vec::new(),
            working_dir: String::new(),
            envs: vec![proto::KeyValue {
                key: "OECRI".into(),
                value: "1".into(),
            }],
            mounts: spec
                .volumes
                .iter()
                .map(|(h, c)| proto::Mount {
                    container_path: c.display().to_string(),
                    host_path: h.display().to_string(),
                    readonly: false,
                })
                .collect(),
            labels: HashMap::new(),
            log_path: if spec.log_directory.is_some() {
                "main.log".into()
            } else {
                String::new()
            },
        };
        let container_id = c
            .create_container(&sandbox_id, container_config, sandbox_config.clone())
            .await?;
        timings.lap("CreateContainer");
        let r =
            async {
                c.start_container(&container_id).await?;
                timings.lap("StartContainer");
                let st = c.container_status(&container_id).await?;
                timings.lap("ContainerStatus");
                let status_running = st.status.clone().ok_or(CriError::Unexpected {
                    step: "ContainerStatus",
                    detail: "no status".into(),
                })?;
                let container_pid = info_pid(&st.info, "ContainerStatus")?;

                let exec_echo = c.exec_sync(&container_id, &["echo", "hi"], 10).await?;
                timings.lap("ExecSync");
                let exec_fail = c
                    .exec_sync(&container_id, &["sh", "-c", "echo err >&2; exit 7"], 10)
                    .await?;
                let ns = c
                    .exec_sync(&container_id, &["readlink", "/proc/self/ns/pid"], 10)
                    .await?;
                let net = c
                    .exec_sync(&container_id, &["readlink", "/proc/self/ns/net"], 10)
                    .await?;
                let cg = c
                    .exec_sync(&container_id, &["cat", "/proc/self/cgroup"], 10)
                    .await?;
                // Let the container use a little CPU so the counters are non-zero.
                c.exec_sync(
                    &container_id,
                    &[
                        "sh",
                        "-c",
                        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
                    ],
                    20,
                )
                .await?;
                let stats = c.container_stats(&container_id).await?;
                timings.lap("ContainerStats");

                let running = Running {
                    sandbox_id: sandbox_id.clone(),
                    sandbox_pid,
                    container_id: container_id.clone(),
                    container_pid,
                    pid_ns_inside: ns.stdout.trim().to_string(),
                    net_ns_inside: net.stdout.trim().to_string(),
                    cgroup_inside: cg.stdout,
                };
                check(&running).map_err(CriError::Check)?;
                timings.lap("check");

                c.stop_container(&container_id, spec.stop_grace_secs)
                    .await?;
                timings.lap("StopContainer");
                let status_stopped = c.container_status(&container_id).await?.status.ok_or(
                    CriError::Unexpected {
                        step: "ContainerStatus after stop",
                        detail: "no status".into(),
                    },
                )?;
                c.remove_container(&container_id).await?;
                timings.lap("RemoveContainer");
                Ok::<_, CriError>((
                    running,
                    status_running,
                    exec_echo,
                    exec_fail,
                    stats,
                    status_stopped,
                ))
            }
            .await;
        if r.is_err() {
            let _ = c.stop_container(&container_id, 0).await;
            let _ = c.remove_container(&container_id).await;
        }
        Ok::<_, CriError>((sandbox_ready, r?))
    }
    .await;

    let (sandbox_ready, (running, status_running, exec_echo, exec_fail, stats, status_stopped)) =
        match result {
            Ok(x) => x,
            Err(e) => {
                let _ = c.stop_pod_sandbox(&sandbox_id).await;
                let _ = c.remove_pod_sandbox(&sandbox_id).await;
                return Err(e);
            }
        };

    c.stop_pod_sandbox(&sandbox_id).await?;
    timings.lap("StopPodSandbox");
    let after = c.pod_sandbox_status(&sandbox_id).await?;
    let sandbox_ready_after_stop =
        after.status.as_ref().map(|s| s.state) == Some(proto::PodSandboxState::SandboxReady as i32);
    c.remove_pod_sandbox(&sandbox_id).await?;
    timings.lap("RemovePodSandbox");
    let left_containers = c
        .list_containers()
        .await?
        .into_iter()
        .map(|x| x.id)
        .collect();
    let left_sandboxes = c
        .list_pod_sandbox()
        .await?
        .into_iter()
        .map(|x| x.id)
        .collect();
    timings.lap("List");

    Ok(PodReport {
        runtime: (v.runtime_name, v.runtime_version, v.runtime_api_version),
        running,
        sandbox_ready,
        status_running,
        exec_echo,
        exec_fail,
        stats,
        status_stopped,
        sandbox_ready_after_stop,
        left_containers,
        left_sandboxes,
        timings: timings.v,
    })
}

/// Step durations.
struct Laps {
    t: Instant,
    v: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn lap(&mut self, name: &'static str) {
        self.v.push((name, self.t.elapsed()));
        self.t = Instant::now();
    }
}

/// [`run_pod_lifecycle`] from synchronous code (a test): its own current-thread runtime.
pub fn run_pod_lifecycle_blocking<F>(spec: &PodSpec, check: F) -> Result<PodReport, CriError>
where
    F: FnOnce(&Running) -> Result<(), String>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CriError::Unexpected {
            step: "tokio runtime",
            detail: e.to_string(),
        })?;
    rt.block_on(run_pod_lifecycle(spec, check))
}

/// Checks a running pod from the HOST side, for [`run_pod_lifecycle`]'s `check`: the container's
/// pid exists in this machine's `/proc`, its pid namespace is the one seen inside the container
/// (so the runtime's pid is a real pid here, not a stranger's), its cgroups name it, the sandbox
/// pid exists, and the pod uses the network namespace of the calling process (host network:
/// call this from a process in the HOST's network namespace).
pub fn check_on_this_host(r: &Running) -> Result<(), String> {
    let net = std::fs::read_link("/proc/self/ns/net")
        .map_err(|e| format!("readlink /proc/self/ns/net: {e}"))?;
    if net.to_string_lossy() != r.net_ns_inside {
        return Err(format!(
            "host network expected: the pod is in {}, this process in {}",
            r.net_ns_inside,
            net.display()
        ));
    }
    let link = std::fs::read_link(format!("/proc/{}/ns/pid", r.container_pid))
        .map_err(|e| format!("container pid {} not in /proc: {e}", r.container_pid))?;
    let link = link.to_string_lossy();
    if link != r.pid_ns_inside {
        return Err(format!(
            "pid namespace of pid {} is {link}, inside the container {}",
            r.container_pid, r.pid_ns_inside
        ));
    }
    if !Path::new(&format!("/proc/{}", r.sandbox_pid)).exists() {
        return Err(format!("sandbox pid {} not in /proc", r.sandbox_pid));
    }
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", r.container_pid))
        .map_err(|e| format!("read /proc/{}/cgroup: {e}", r.container_pid))?;
    if !cg.contains(&r.container_id) {
        return Err(format!(
            "container {} not in its cgroups: {cg}",
            r.container_id
        ));
    }
    Ok(())
}
