//! berth: a Kubernetes node container runtime speaking the CRI.
//!
//! One module per piece of the runtime (see `DESIGN.md`):
//! - [`alloc`]: the C allocator of a long-running daemon (arena cap, trims after bursts);
//! - [`cgroups`]: container cgroup paths (cgroupfs, systemd), layouts, OOM counters;
//! - [`cri`]: the CRI types, servers and clients generated from the pinned `api.proto`;
//! - [`config`]: the TOML configuration contract and its defaults;
//! - [`events`]: container and pod lifecycle events for `GetContainerEvents`;
//! - [`store`]: the durable embedded database of berth's records;
//! - [`ids`]: object ids, id-prefix lookup, timestamps;
//! - [`image`]: registry pulls, the content store, layer snapshots, image records;
//! - [`metrics`]: Prometheus `/metrics` over HTTP (RPCs, objects, per-container usage);
//! - [`network`]: pod networking, native (rtnetlink + nftables) or CNI;
//! - [`nri`]: NRI plugins: the socket, synchronization, events and adjustments;
//! - [`node_check`]: what the node's kernel must have (overlayfs, forwarding), at start and in `Status`;
//! - [`notify`]: systemd readiness notifications (`READY=1`, `STOPPING=1`);
//! - [`ns`]: namespace work on dedicated threads, pinned namespaces;
//! - [`runtime`]: the OCI runtime CLI (runc, crun) per RuntimeClass handler;
//! - [`sandbox`]: pod sandboxes: namespaces, pod files, sysctls, pod init, records;
//! - [`server`]: the CRI gRPC services on the unix socket;
//! - [`span`]: the pod and container ids an RPC's log span carries;
//! - [`stats`]: container and pod resource usage (cgroups, writable layer, pod network);
//! - [`stream`]: the Exec/Attach/PortForward streaming server (SPDY/3.1).

pub mod alloc;
pub mod cgroups;
pub mod config;
pub mod container;
pub mod cri;
pub mod events;
pub mod ids;
pub mod image;
pub mod locks;
pub mod metrics;
pub mod monitor;
pub mod network;
pub mod node_check;
pub mod notify;
pub mod nri;
pub mod ns;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod span;
pub mod stats;
pub mod store;
pub mod stream;
